"""FERD Studio entry point: `streamlit run app/main.py` from the repository root.

Navigation over the pages in ../pages (a page whose file is missing is skipped) and the job queue
in the sidebar. UMAP warms up in the background when the Samples page is first opened
(app.state.get_umap_service).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts app/, not the repository root, on sys.path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app.state import get_registry  # noqa: E402
from app.widgets import job_queue  # noqa: E402

PAGES = (
    ("1_Live.py", "Live run", ":material/monitoring:"),
    ("2_Compare.py", "Compare", ":material/compare_arrows:"),
    ("3_Samples.py", "Samples", ":material/photo_library:"),
    ("4_Ablation.py", "Ablation", ":material/tune:"),
    ("5_Learn.py", "Learn", ":material/school:"),
    ("6_Runs.py", "Runs", ":material/history:"),
)

# A page icon of our own: without one the browser tab shows the current page's material icon, which the
# Streamlit frontend loads from fonts.gstatic.com (an emoji is drawn from a data: URI, nothing is fetched).
st.set_page_config(page_title="FERD Studio", page_icon="🛡️", layout="wide")
pages = [st.Page(ROOT / "pages" / file, title=title, icon=icon, default=i == 0)
         for i, (file, title, icon) in enumerate(PAGES) if (ROOT / "pages" / file).is_file()]
navigation = st.navigation(pages)
with st.sidebar:
    st.fragment(job_queue, run_every=2.0)(get_registry())
navigation.run()
