"""`regkl report`: the batch HTML report from a finished batch."""

from __future__ import annotations


import click

from ._common import check_output


@click.command("report")
@click.argument("summary", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--title", default=None, help="Page title [default: from the results folder's name].")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def report_cmd(summary, output, title, debug):
    """HTML report of a finished batch, from SUMMARY (regkl_summary.json or the folder holding it).

    Every pair with its QC picture, identifiers, metric, time, confidence, suspect flag and error;
    worst first, sortable by any column. Self-contained: pictures are embedded in the file.

    \b
    Example:
      regkl report /data/ds000001/derivatives/regkl -o report.html
    """
    from ..report import load_summary, write_report

    rows, source = load_summary(summary)
    check_output(output, (source,))
    folder = source.resolve().parent
    if folder.name == "regkl" and folder.parent.name == "derivatives":  # the default ROOT/derivatives/regkl
        folder = folder.parent.parent
    write_report(rows, output, title=title or f"regkl batch report: {folder.name}", source=f"from {source}",
                 protect=(source,))
