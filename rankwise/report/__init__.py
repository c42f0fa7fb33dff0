"""Analysis for compression: per-layer report, terminal table, JSON and a self-contained HTML page."""

from rankwise.report.analysis import AnalysisReport, LayerReport, SideSpectrum, analyze
from rankwise.report.html import render_html, write_html

__all__ = ["analyze", "AnalysisReport", "LayerReport", "SideSpectrum", "render_html", "write_html"]
