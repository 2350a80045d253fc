"""LightningModules: one per kind of training stage."""

from kdpipe.modules.classifier import ClassifierModule
from kdpipe.modules.distill import DistillationModule, FeatureHooks

__all__ = ["ClassifierModule", "DistillationModule", "FeatureHooks"]
