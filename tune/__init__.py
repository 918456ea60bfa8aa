"""Ray Tune sweeps over regularization strengths (function trainables call the same jobs.X.run(cfg)); built in later issues."""
