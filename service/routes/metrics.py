"""Prometheus exposition of the app's registry."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(m: MetricsDep) -> Response:
    return Response(m.exposition(), media_type=m.content_type)
