"""Training: settings and the paper's recipes (`config`), the loop (`loop`) and what keeps a run safe
to stop and resume (`safety`)."""
