"""`regkl report`: the batch HTML report from a finished batch."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import check_output, log


@click.command("report")
@click.argument("summary", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--title", default=None, help="Page title [default: from the results folder's name].")
@click.option("-q", "--quiet", is_flag=True, help="No message on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def report_cmd(summary, output, title, quiet, debug):
    """HTML report of a finished batch, from SUMMARY (the results folder, or its logs/regkl_summary.json).

    Every pair with its QC picture, identifiers, metric, time, confidence, suspect flag and error;
    worst first, sortable by any column. Self-contained: pictures are embedded in the file.

    \b
    Example:
      regkl report /data/ds000001/derivatives/regkl -o report.html
    """
    from ..report import INPUT_FIELDS, OUTPUT_FIELDS, load_summary, write_report

    from ..errors import OutputError

    rows, source = load_summary(summary)
    protect = [source, source.with_suffix(".tsv")] + [r[k] for r in rows for k in INPUT_FIELDS + OUTPUT_FIELDS if r.get(k)]
    check_output(output, protect)
    if Path(output).suffix.lower() not in (".html", ".htm"):
        raise OutputError("the report is an HTML page: give a name ending in .html", path=output)
    folder = source.resolve().parent
    if folder.name == "logs":
        folder = folder.parent
    if folder.name == "regkl" and folder.parent.name == "derivatives":  # the default ROOT/derivatives/regkl
        folder = folder.parent.parent
    write_report(rows, output, title=title or f"regkl batch report: {folder.name}", source=f"from {source}",
                 protect=protect)
    log(quiet)(f"report of {len(rows)} pair(s) written to {output}")
