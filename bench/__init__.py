"""``upscaled bench`` and the HTML reports: comparing models the way the papers do, apart from the service.

:mod:`bench.run` runs every model at every scale on a dataset with the measurement protocol of
:mod:`daemon.protocol` (the same one the service's benchmark mode uses) and records the run in the history;
:mod:`bench.report` writes self-contained HTML reports of a run (``--report``) and of the service's history
(``upscaled report``).
"""
