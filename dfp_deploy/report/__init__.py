"""Reports: render the JSON report (the source of truth) as Markdown; compute nothing new."""
