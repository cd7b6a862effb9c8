"""The recipe end to end: the stage plan and its folders, the pipeline (stage A, every
stage, test mode, quantize), the banner, joining a multi-host job, plots of a run."""
