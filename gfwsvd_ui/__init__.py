"""Streamlit helpers of the explorer: session state, background jobs on screen, Plotly figures."""
