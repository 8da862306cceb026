"""The web app of ``mpi-imgproc web``: a page and a JSON API over a running cluster.

:func:`mpi_imgproc.web.app.create_app` builds the FastAPI app (routes in :mod:`.app`, jobs
in :mod:`.jobs`, the page in ``static/``); :mod:`.command` is the command line, which loads
without the ``web`` extra.  ``docs/web.md`` describes the API and the page.
"""
