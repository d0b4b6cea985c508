"""Corpus preparation on datatrove: raw, mixed-language text in, a clean target-language corpus out.

`settings` is the config section (imported by lowlm.config, so it must not import datatrove);
`languages`, `lid`, `quality`, `readers`, `decontaminate` build datatrove pipeline steps;
`pipeline` runs them with an executor and `summary` turns datatrove's stats into stats.json.
"""
