"""Figures, the HTML page builder, the report and the head page."""
