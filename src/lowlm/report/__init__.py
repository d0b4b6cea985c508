"""`lowlm report`: one self-contained HTML page of a run, read from its run directory alone.

The page shows, per stage of the graph, its status (done, stale with the inputs that changed,
running, interrupted, failed, not run), its time, key figures and energy from manifest.json;
the tokenizer's before/after chart (tokenizer/report.json); the held-out loss per character
from the base through resize and each pre-training stage; the training and held-out loss
curves of every pre-training stage on one time axis and SFT's loss (each stage's log.jsonl);
the eval table (eval/results.json) beside a baseline's results.json, with per-subject bars;
and a few of eval's recorded answers. Nothing is re-run and no model is loaded.

The page loads nothing: charts are PNGs drawn by matplotlib (Agg) and inlined as data: URIs,
styles are inline, and a content-security-policy meta tag forbids every other request, so it
reads the same offline, attached to a message or opened from a shared disk.

`stage_summary` formats the short table `lowlm run` prints when a stage finishes.
"""

from lowlm.report.page import REPORT_FILE, render, write_report
from lowlm.report.text import stage_summary

__all__ = ["REPORT_FILE", "render", "stage_summary", "write_report"]
