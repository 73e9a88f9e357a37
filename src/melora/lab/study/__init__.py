"""Studies as files: ``melora study STUDY.yaml`` plans, runs (resumably) and reports."""
