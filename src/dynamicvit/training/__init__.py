"""Training: settings and the paper's recipes (`config`), the loop read in one sitting (`loop`), the
run's state, checkpoint and random state (`state`), the student and teacher (`models`), the data
(`loaders`), what a run reports (`metrics`), its place in a torchrun job (`distributed`) and what
keeps it safe to stop and resume (`safety`)."""
