"""The distillation stage's schemes: offline (with teacher-output cache and teacher-assistant
chains), online (deep mutual learning) and self-distillation, plus their config checks."""
