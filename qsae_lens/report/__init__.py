"""Reports: one section per step result, assembled into JSON, markdown and one self-contained HTML page.

Every step of the sweep (and every analysis added later) contributes a :class:`ReportSection`;
the page is the ordered list of sections, so a new analysis adds a section without editing others.
"""

from qsae_lens.report.section import ReportSection, figure_html, html_table, markdown_table

__all__ = ["ReportSection", "figure_html", "html_table", "markdown_table"]
