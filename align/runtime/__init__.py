"""Runtime plumbing shared by every job: typed YAML configs, where outputs live, run state on disk."""
