"""Corpus preparation on datatrove: raw, mixed-language text in, a clean target-language corpus out.

`settings` is the config section and `inputs` resolves `prepare.inputs` (both imported by the
config and the stage graph, so neither imports datatrove); `languages`, `lid`, `readers`,
`quality` and `decontaminate` build datatrove pipeline steps; `pipeline` runs them as phases
with an executor; `build` decides everything before the run and drives it; `summary` turns
datatrove's stats into stats.json. The stage itself is lowlm.stages.prepare.
"""
