"""Stage 2: train regression students from the teacher's cached targets.

`train.train_student` reads the store written by `teacher_dump` (the two stages meet only through
`store/`), re-renders each crop from its stored spec and runs the shared
`distilpose.training.engine.Trainer` with the paper's distillation loss. `ablate.ablate` trains
one student per loss combination of the paper's Table 4 and tabulates their AP.
"""
