"""Evaluation (section 3): benchmarks (`benchmarks`), running a model on one (`runner`), tables and plots
(`report`). The metrics are in r1flow.rewards.grading, which GRPO's validation also uses."""
