"""FERD Studio: the Streamlit dashboard (pages in ../pages), its job registry, frames and chart builders."""
