"""Views of a Plan for people and other tools: explanation, plots, logical-axis rules."""
