"""gfwsvd explorer: Streamlit router over pages/ with a shared sidebar."""

from pathlib import Path

import streamlit as st

from gfwsvd_ui.state import sidebar_status, ws

st.set_page_config(page_title="gfwsvd explorer", page_icon=str(Path(__file__).parent / "assets" / "favicon.png"), layout="wide")

pages = [
    st.Page("pages/model_data.py", title="Model & data", icon=":material/database:", default=True),
    st.Page("pages/factors.py", title="Fisher factors", icon=":material/grid_on:"),
    st.Page("pages/layer_lab.py", title="Layer lab", icon=":material/science:"),
    st.Page("pages/ranks.py", title="Ranks", icon=":material/tune:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
]
nav = st.navigation(pages)

with st.sidebar:
    w = ws()
    st.caption("Fisher-weighted low-rank compression")
    if w.exp is None:
        st.write("No model loaded.")
    else:
        exp = w.exp
        st.write(f"**{exp.settings['model']}** · {exp.bundle.task}")
        st.write(f"{len(exp.calib.texts)} calibration / {len(exp.evaluation.texts)} held-out texts")
        st.write("statistics: " + ("collected" if exp.stats else "not yet"))
    sidebar_status()  # the running job's latest message and the background decompositions, kept current

nav.run()
