"""The pipeline layer: what the stages are and how they run together.

- :mod:`workflow.spec`: the types a stage is declared with (:class:`~workflow.spec.StageSpec`);
- :mod:`workflow.stages`: one declaration per stage: what it reads, writes and depends on;
- :mod:`workflow.contract`: the records beside the outputs, and the one reading of them
  (done, resumable, outdated) every stage, the runner and the check share;
- :mod:`workflow.check`: the pre-flight check of what the stages ahead will read;
- :mod:`workflow.runner`: the runner ``python pipeline.py`` drives.

Imports go one way: spec <- stages <- contract; check and runner sit on top. Stage scripts
import ``workflow.contract`` and ``workflow.check``; nothing in ``core/`` imports this package.
"""
