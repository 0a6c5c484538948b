"""FERD Studio library: fairness-enhanced data-free robustness distillation (FERD) and a DFRD baseline.

Never imports streamlit. See README.md for the CLI and the dashboard.
"""
