"""PDF referral reports and run summaries, with Grad-CAM heatmaps.

:func:`write_reports` is the entry point (``cervscan report``, ``cervscan batch --report``);
:func:`write_heatmaps` writes the heatmaps alone. Modules, by concern:

- :mod:`~cervscan.report.reports`: :func:`write_reports`, the run's options and output checks;
- :mod:`~cervscan.report.tables`: reading the screen output, refusing tables that do not belong together;
- :mod:`~cervscan.report.patient`: one patient's report; :mod:`~cervscan.report.summary`: the run summary;
- :mod:`~cervscan.report.layout`: styles, page footer, the PDF writer, tables both reports use;
- :mod:`~cervscan.report.wording`: what the reports say, in words (decisions, models, stages, captions);
- :mod:`~cervscan.report.heatmaps`: Grad-CAM of the run's classifier (:mod:`~cervscan.report.gradcam`);
- :mod:`~cervscan.report.fonts` and :mod:`~cervscan.report.bidi`: text in any script, patient ids;
- :mod:`~cervscan.report.filenames`: the report's file name of each patient id.
"""

from cervscan.report.heatmaps import write_heatmaps
from cervscan.report.reports import write_reports

__all__ = ["write_heatmaps", "write_reports"]
