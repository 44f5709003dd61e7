"""Reports: assemble the frozen BuildReport from the stages' results (the JSON source of truth) and render it as
Markdown; compute nothing new."""
