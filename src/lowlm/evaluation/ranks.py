"""Native eval tasks on several processes (`accelerate launch`, `torchrun`): each rank scores
a contiguous share of a task's questions (accelerate's split_between_processes) and every rank
gets all the scores back in the original order (accelerate's gather_object), so the
predictions are those of one process."""

from __future__ import annotations

from dataclasses import dataclass

from lowlm.processes import launched_state


@dataclass
class Ranks:
    state: object | None = None  # accelerate's PartialState under several processes

    @property
    def world(self) -> int:
        return self.state.num_processes if self.state is not None else 1

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def share(self, items: list) -> list:
        """This rank's contiguous share of `items` (all of them in one process)."""
        if self.state is None:
            return items
        with self.state.split_between_processes(items) as mine:
            return list(mine)

    def gather(self, part: list) -> list:
        """Every rank's share, concatenated in rank order, on every rank."""
        if self.state is None:
            return part
        from accelerate.utils import gather_object

        return gather_object(part)


def eval_ranks() -> Ranks:
    """The processes this eval runs on: one, or accelerate's state of a launch."""
    return Ranks(launched_state())
