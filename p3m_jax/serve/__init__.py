"""A web page and an HTTP API for mattes: ``python -m p3m_jax.serve`` (also ``p3m-serve``).

    python -m p3m_jax.serve --checkpoint CKPT [--arch A] [--ema] [--host 127.0.0.1] [--port 8000] \\
        [--strategy hybrid] [--queue 8] [--max_megabytes 32] [--max_megapixels 40] [--compile_at_start]
    python -m p3m_jax.serve --exported model.stablehlo ...

Needs the serve extra: pip install "p3m-jax[serve]" (FastAPI, uvicorn, python-multipart).

GET /             the page: drop or choose a photo (or a sample portrait), see the matte, the cutout over
                  a checkerboard and the person over a colour or an image, download each as PNG.
POST /v1/matte    multipart form: ``image`` (JPEG, PNG or WebP; EXIF rotation applied), optional
                  ``strategy`` (resize|hybrid), ``output`` (alpha, the default, rgba or composite),
                  ``foreground`` (original|estimate), ``background`` (a colour: white, #00b140, 0,177,64) or
                  ``background_image`` (a file). Answers the PNG that ``python -m p3m_jax.predict`` writes
                  for the same weights, strategy and photo (<name>_alpha.png, _rgba.png, _composite.png);
                  a bad request gets a 4xx status and JSON ``{"error": "..."}``.
GET /healthz      JSON: the model, where its weights came from, whether it has compiled, the queue.

One model run at a time: requests wait in a queue of ``--queue`` places, and a full queue answers 503
with Retry-After. Photos stay in memory while they are processed: they are never written to disk
(the form is parsed in memory) and never logged; a request's log line gives its path, status, sizes
and time. It binds to 127.0.0.1; ``--host 0.0.0.0`` exposes it (put it behind a reverse proxy). A
checkpoint that cannot be loaded, or a port that cannot be bound, is one ``error:`` line and exit
status 2. Every distinct photo size compiles the network once (kept in JAX's persistent cache);
``--compile_at_start`` compiles for the sample portraits' size while the server starts.
"""
