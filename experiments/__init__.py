"""One runnable file per paper: ``python experiments/<paper>.py [--data ...] [--preset ...]``.

Each file declares a :class:`drkeras.experiment.Experiment` (its presets and ``prepare``: the
run's declared stages and report) and ends with ``raise SystemExit(main(<Experiment>()))``; its
docstring gives the command, the expected runtime and the expected result.
"""
