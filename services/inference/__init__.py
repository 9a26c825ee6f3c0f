"""Inference service: model replicas as Ray actors behind `magi.infer.*`. Ray lives only here."""
