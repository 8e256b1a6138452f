"""`cxr report`: the runs of an experiment -> the paper's Tables 3 and 4, the metrics the paper
lacked, and the figures.

  runs (the MLflow children of a `cxr run`, or a folder of fold{k}-{network}.csv files)
  -> table3.csv, table4.csv (+ average and std rows), metrics.csv (every per-class metric of
     every run with its 95% interval), summary.csv, tables.md, report.json, figures/
  -> logged to the parent MLflow run, and each run's training curves to that run

Missing runs are listed by name; the tables are built from the runs that exist.

One module per step, in the order the data flows: inputs (the runs, read and checked), tables
(Tables 3 and 4, the metrics, the results by source), notes (what the tables must warn about),
render (Markdown, figures, the console), to_mlflow (the parent run), build (`cxr report` and
the writing of its files, in that order).
"""
