"""Training: the one training loop (`engine`), the losses (`losses`), the typed run objects
saved for `--resume` (`runs`) and what makes several processes one run (`distributed`).

Both stages train through here: `teacher_dump.train` (heatmap teachers) and `student_train`
(students from the store). Import the modules themselves; this file imports nothing.
"""
