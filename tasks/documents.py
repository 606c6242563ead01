"""Document tasks: the whole package (title and chapters) as one PDF."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tasks import app, pdf
from tasks.lifecycle import connection, job_to_work_on
from tasks.package import PDF_TASK, package_chapters
from tasks.storage import get_storage, store_artifact


@app.task(name=PDF_TASK, bind=True)
def render_package_pdf(self, job_id: str) -> dict[str, Any]:
    """Render the job's package, store it at ``{userId}/{jobId}/pdf/{taskId}.pdf``."""
    job = job_to_work_on(job_id, self.request)
    if job is None:
        return {"skipped": True}
    chapters = package_chapters(job.params)
    with tempfile.TemporaryDirectory(prefix="pg-broker-pdf-") as scratch:
        document = Path(scratch) / "package.pdf"
        with open(document, "wb") as out:
            pages = pdf.render_package(job.title or "Untitled", chapters, out)
        artifact = store_artifact(
            connection(), get_storage(),
            job_id=job.id, user_id=job.user_id, task_id=self.request.id, kind="pdf",
            source=document, content_type=pdf.CONTENT_TYPE,
            metadata={"pages": pages, "chapters": len(chapters)},
        )
    return {"path": artifact.storage_path, "bytes": artifact.bytes, "pages": pages}
