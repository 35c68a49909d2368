"""The learner process: its gRPC service (the contract in protos/flywheel.proto) and `serve`.

Episodes arrive over PushEpisodes into the durable buffer (`buffer.py`); `updates.py`
decides when to train and on what, `trainer.py` runs the GRPO update, `publish.py` hands
each new adapter version to the proxy. Train runs an update on demand and streams its
events; Status reports the buffer; WatchAdapters streams every published version.

Under torchrun rank 0 runs `serve` and every other rank `follow` (`distributed.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import signal

import grpc

from flywheel.learner.config import LearnerConfig
from flywheel.learner.distributed import Ranks, Stop, decode_state, receive
from flywheel.learner.updates import Learner
from flywheel.protos import flywheel_pb2 as pb
from flywheel.protos import flywheel_pb2_grpc as pb_grpc

log = logging.getLogger("flywheel.learner")


class Servicer(pb_grpc.LearnerServicer):
    def __init__(self, learner: Learner):
        self.learner = learner

    async def PushEpisodes(self, request_iterator, context):
        episodes = [episode async for episode in request_iterator]
        accepted, duplicates = self.learner.buffer.add(episodes)
        return pb.PushAck(accepted=accepted, duplicates=duplicates, episode_ids=[e.episode_id for e in episodes])

    async def Train(self, request, context):
        events: asyncio.Queue = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(self.learner.update("on demand", events.put_nowait,
                                                                              force=request.force))
        while not (task.done() and events.empty()):
            try:
                yield await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue
            if not request.wait:
                return
        if task.exception() is not None:
            yield pb.TrainEvent(error=str(task.exception()))

    async def Status(self, request, context):
        return self.learner.status()

    async def Erase(self, request, context):
        return pb.EraseReply(erased=self.learner.buffer.erase(request.episode_ids))

    async def WatchAdapters(self, request, context):
        queue: asyncio.Queue = asyncio.Queue()
        self.learner.publisher.watchers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.learner.publisher.watchers.remove(queue)


class TokenCheck(grpc.aio.ServerInterceptor):
    """Every call must carry `authorization: Bearer <token>` (the proxy's learner_token)."""

    def __init__(self, token: str):
        self._expected = hashlib.sha256(f"Bearer {token}".encode()).digest()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        presented = dict(details.invocation_metadata or ()).get("authorization", "")
        if handler is None or hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), self._expected):
            return handler

        async def refuse(_request, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong learner token")

        # a refusal of the same shape as the method, so gRPC reads the request the way it expects
        make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
        return make[handler.request_streaming, handler.response_streaming](
            refuse, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def grpc_server(learner: Learner) -> grpc.aio.Server:
    """The learner's gRPC server on `config.listen`, not started."""
    limit = learner.config.max_message_bytes
    token = learner.config.token
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit)],
                             interceptors=[TokenCheck(token)] if token else None)
    pb_grpc.add_LearnerServicer_to_server(Servicer(learner), server)
    server.add_insecure_port(learner.config.listen)
    return server


async def serve(config: LearnerConfig, model_dir: str, ranks: Ranks = Ranks()) -> None:
    """The learner until it is stopped; under torchrun, rank 0's part, telling the others to stop at the end."""
    learner = Learner(config, model_dir, ranks)
    server = grpc_server(learner)
    await server.start()
    if ranks.world > 1:  # torchrun passes Ctrl-C and SIGTERM to every rank: stop serving, then tell the others
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop(grace=5)))
    log.info("learner listening on %s (state %s, %d episodes buffered, adapters: %s)", config.listen,
             config.state_dir, len(learner.buffer.pending), {a: r.served_name for a, r in learner.publisher.latest.items()})
    scheduler = asyncio.get_running_loop().create_task(learner.schedule())
    try:
        await server.wait_for_termination()
    finally:
        scheduler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scheduler
        await server.stop(grace=5)
        await asyncio.to_thread(learner.close)


def follow(config: LearnerConfig, model_dir: str, ranks: Ranks) -> None:
    """A rank other than 0: run every update rank 0 sends, in step with it, until it says stop.

    Ctrl-C and SIGTERM are ignored here: torchrun passes them to every rank, and a rank that
    died of them would leave rank 0's stop message (a collective) unanswered; torchrun kills
    what is left if rank 0 itself dies."""
    from flywheel.learner.trainer import AdapterSnapshot, PolicyTrainer, UpdateRefused

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    trainer = None
    while not isinstance(message := receive(), Stop):
        if trainer is None:  # loaded on the first update, as on rank 0
            trainer = PolicyTrainer(model_dir, config.trainer, config.loss, ranks)
        trainer.ensure_adapter(message.adapter)
        if message.state is not None:
            trainer.restore(message.adapter, AdapterSnapshot(**decode_state(message.state, trainer.device)))
        with contextlib.suppress(UpdateRefused):  # refused on rank 0 alike: nothing stepped anywhere
            trainer.update(message.adapter, message.items, max_mismatch=message.max_mismatch)
