"""The trainer: `run.train(TrainConfig)` from a config (`config`), through data splits (`splits`), precision and
accelerator (`precision`), the run folder (`rundir`), optimizer and schedule (`optim`), the loop (`loop`, `loss`),
checkpoints (`checkpoint`), evaluation (`evaluate`) and what a run leaves behind (`report`)."""
