"""hawq's pipeline: config, run store, stages, scheduler, backends, CLI and report.

Entry points: ``pipeline.scheduler.run(cfg, run_dir)`` / ``resume(run_dir)`` /
``status(run_dir)``, ``pipeline.report.report(run_dir)`` and the ``hawq`` console script
(``pipeline.cli:main``). Submodules are imported lazily by their users: importing ``pipeline``
itself loads nothing heavy.
"""
