"""Redis-backed replay store for clusters: the same semantics as `MemoryStore` (see replay/store.py).

Layout under the prefix `P = <key_prefix>:<run name>` (one run per prefix, so several runs share a server):

    P:g:<key>    payload (msgpack + raw numpy buffers; never pickle)
    P:prio       ZSET key -> priority          (lowest-priority eviction)
    P:order      ZSET key -> insertion seq     (oldest eviction)
    P:ver        ZSET key -> policy version    (staleness eviction)
    P:fresh      ZSET key -> seq               (never sampled yet)
    P:q, P:qb    HASH key -> sampling weight q = max(priority, 1e-6)^a, and its bucket b = ceil(log2 q)
    P:b:<b>      SET of keys whose q lies in (2^(b-1), 2^b];  P:bc  HASH b -> count;  P:qsum  sum of q
    P:ns         HASH key -> times sampled;     P:stats  HASH counters;   P:version  learner's weight version
    P:atbound    SET of keys that arrived on their last valid version (lag = max_policy_lag: one draw to catch them)
    P:weights    the latest WeightVersion announcement (msgpack)
    P:pc, P:pt, P:pe   HASH prompt -> correct count, samples, accuracy estimate
    P:seen:<key> dedupe marker (expires), so a writer's retry never inserts a group twice
    P:quarantine LIST of payloads that failed to decode (capped)
    P:meta       HASH identity of the run that claimed the prefix (`claim`)
    P:success:*  PACED-RL's success buffer: the same layout, one successful response per entry

Every mutation is one Lua script, so inserts, eviction and sampling are atomic. Proportional sampling is exact:
pick a bucket with probability proportional to count_b * 2^b, a member uniformly (SRANDMEMBER), and accept
with probability q / 2^b (always > 1/2); the accepted key has probability q / sum(q). Connections retry with
exponential backoff; scripts are re-loaded after a server restart.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from configs.schema import RedisReplayConfig
from replay.records import (
    PromptStats,
    RolloutGroup,
    SampledBatch,
    WeightVersion,
    decode_weight_version,
    encode_group,
    encode_weight_version,
)
from replay.store import (
    STAT_FIELDS,
    Draw,
    ReplayStats,
    check_add_arguments,
    check_identity,
    check_identity_fields,
    decode_draw,
    initial_priorities,
    sampling_weight,
    split_batch,
    success_inserts,
    success_table_config,
)

DEDUPE_TTL_S = 3600
"""How long a group id is remembered so a writer's retry never inserts it twice. A retry comes within the client's
backoff (about a minute); later than an hour, the group is far beyond any policy-lag bound and is refused as stale
on arrival anyway. The markers cost ~160 bytes per group, so memory stays bounded by rate x this, not by the run's
length."""
QUARANTINE_MAX = 1000

_LUA_COMMON = r"""
local P = KEYS[1]
local function bucket_of(q)
  local b = math.ceil(math.log(q) / math.log(2))
  if q > 2 ^ b then b = b + 1 end
  if q <= 2 ^ (b - 1) then b = b - 1 end
  return b
end
local function index_add(key, q)
  local b = bucket_of(q)
  redis.call('SADD', P .. ':b:' .. b, key)
  redis.call('HINCRBY', P .. ':bc', b, 1)
  redis.call('HSET', P .. ':q', key, string.format('%.17g', q))
  redis.call('HSET', P .. ':qb', key, b)
  redis.call('INCRBYFLOAT', P .. ':qsum', string.format('%.17g', q))
end
local function index_remove(key)
  local q = redis.call('HGET', P .. ':q', key)
  if not q then return end
  local b = redis.call('HGET', P .. ':qb', key)
  redis.call('SREM', P .. ':b:' .. b, key)
  if redis.call('HINCRBY', P .. ':bc', b, -1) <= 0 then redis.call('HDEL', P .. ':bc', b) end
  redis.call('HDEL', P .. ':q', key)
  redis.call('HDEL', P .. ':qb', key)
  if redis.call('HLEN', P .. ':q') == 0 then
    redis.call('SET', P .. ':qsum', '0')
  else
    redis.call('INCRBYFLOAT', P .. ':qsum', '-' .. q)
  end
end
local function remove(key)
  index_remove(key)
  redis.call('DEL', P .. ':g:' .. key)
  redis.call('ZREM', P .. ':prio', key)
  redis.call('ZREM', P .. ':order', key)
  redis.call('ZREM', P .. ':ver', key)
  redis.call('ZREM', P .. ':fresh', key)
  redis.call('HDEL', P .. ':ns', key)
  redis.call('SREM', P .. ':atbound', key)
end
local function count_unsampled(keys)  -- evicted before any batch drew them: generated, never trained on
  local n = 0
  for _, key in ipairs(keys) do
    if redis.call('ZSCORE', P .. ':fresh', key) then n = n + 1 end
  end
  if n > 0 then redis.call('HINCRBY', P .. ':stats', 'evicted_unsampled', n) end
end
local function evict_stale(max_lag)
  local v = tonumber(redis.call('GET', P .. ':version') or '0')
  local stale = redis.call('ZRANGEBYSCORE', P .. ':ver', '-inf', '(' .. (v - max_lag))
  count_unsampled(stale)
  local late = 0
  for _, key in ipairs(stale) do
    if redis.call('ZSCORE', P .. ':fresh', key) and redis.call('SISMEMBER', P .. ':atbound', key) == 1 then
      late = late + 1
    end
  end
  if late > 0 then redis.call('HINCRBY', P .. ':stats', 'evicted_late', late) end
  for _, key in ipairs(stale) do remove(key) end
  if #stale > 0 then redis.call('HINCRBY', P .. ':stats', 'evicted_stale', #stale) end
end
"""

# ARGV: capacity, eviction, dedupe_ttl, n_groups, n_offered, then n_groups x (key, payload, priority, q, version),
# then n_offered x (prompt_id, correct, samples), then max_policy_lag. The i-th offered group is the i-th group (or
# none are offered), so a duplicate's prompt is not counted twice. Returns the keys inserted and still present.
_ADD = (
    _LUA_COMMON
    + r"""
local capacity, eviction, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local n, m = tonumber(ARGV[4]), tonumber(ARGV[5])
local inserted = {}
local oldest_fresh = tonumber(redis.call('GET', P .. ':version') or '0') - tonumber(ARGV[6 + n * 5 + m * 3])
local stale = 0
local duplicate = {}
for i = 0, n - 1 do
  local a = 6 + i * 5
  local key = ARGV[a]
  if not redis.call('SET', P .. ':seen:' .. key, '1', 'NX', 'EX', ttl) then
    redis.call('HINCRBY', P .. ':stats', 'duplicates', 1)
    duplicate[i] = true  -- a retry: its prompt was counted the first time
  elseif tonumber(ARGV[a + 4]) < oldest_fresh then
    stale = stale + 1  -- made by weights the learner has left behind: never inserted
  else
    local seq = redis.call('INCR', P .. ':seq')
    redis.call('SET', P .. ':g:' .. key, ARGV[a + 1])
    redis.call('ZADD', P .. ':prio', ARGV[a + 2], key)
    redis.call('ZADD', P .. ':order', seq, key)
    redis.call('ZADD', P .. ':ver', ARGV[a + 4], key)
    redis.call('ZADD', P .. ':fresh', seq, key)
    redis.call('HSET', P .. ':ns', key, 0)
    index_add(key, tonumber(ARGV[a + 3]))
    inserted[#inserted + 1] = key
    if tonumber(ARGV[a + 4]) == oldest_fresh then redis.call('SADD', P .. ':atbound', key) end
  end
end
redis.call('HINCRBY', P .. ':stats', 'inserted', #inserted)
if stale > 0 then redis.call('HINCRBY', P .. ':stats', 'stale_on_arrival', stale) end
for j = 0, m - 1 do
  if not duplicate[j] then
    local a = 6 + n * 5 + j * 3
    redis.call('HINCRBYFLOAT', P .. ':pc', ARGV[a], ARGV[a + 1])
    redis.call('HINCRBY', P .. ':pt', ARGV[a], ARGV[a + 2])
  end
end
local excess = redis.call('ZCARD', P .. ':prio') - capacity
if excess > 0 then
  local index = eviction == 'oldest' and ':order' or ':prio'
  local victims = redis.call('ZRANGE', P .. index, 0, excess - 1)
  count_unsampled(victims)
  for _, key in ipairs(victims) do remove(key) end
  redis.call('HINCRBY', P .. ':stats', 'evicted_capacity', #victims)
end
local present = {}
for _, key in ipairs(inserted) do
  if redis.call('EXISTS', P .. ':g:' .. key) == 1 then present[#present + 1] = key end
end
return present
"""
)

# ARGV: n_fresh, n_prio, seed, max_lag, fresh order ('oldest' / 'newest').
# Returns a flat list of (key, priority, probability, times, fresh).
# Payloads are fetched with one MGET afterwards: moving megabytes through Lua strings costs 7x more.
_SAMPLE = (
    _LUA_COMMON
    + r"""
local n_fresh, n_prio, seed, max_lag = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local fresh_range = ARGV[5] == 'oldest' and 'ZRANGE' or 'ZREVRANGE'
math.randomseed(seed)
evict_stale(max_lag)
if redis.call('ZCARD', P .. ':prio') == 0 then return {} end
-- Last chance first: fresh groups the next weight version would evict as stale are drawn now, even beyond the
-- batch's fresh share, rather than generated for nothing (oldest first; older versions are evicted already).
local v = tonumber(redis.call('GET', P .. ':version') or '0')
local chosen, taken, last = {}, {}, {}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', P .. ':ver', '-inf', v - max_lag)) do
  local seq = redis.call('ZSCORE', P .. ':fresh', key)
  if seq then last[#last + 1] = {tonumber(seq), key} end
end
table.sort(last, function(a, b) return a[1] < b[1] end)
for i = 1, math.min(#last, n_fresh + n_prio) do
  chosen[i] = last[i][2]
  taken[last[i][2]] = true
end
if #chosen > n_fresh then
  n_prio = n_prio - (#chosen - n_fresh)
  n_fresh = #chosen
end
if n_fresh > #chosen then
  local want = n_fresh - #chosen
  for _, key in ipairs(redis.call(fresh_range, P .. ':fresh', 0, want + #chosen - 1)) do
    if want > 0 and not taken[key] then
      chosen[#chosen + 1] = key
      want = want - 1
    end
  end
end
local n_chosen_fresh = #chosen
n_prio = n_prio + n_fresh - n_chosen_fresh
local buckets, weights, total = {}, {}, 0
local bc = redis.call('HGETALL', P .. ':bc')
for i = 1, #bc, 2 do
  local b, c = tonumber(bc[i]), tonumber(bc[i + 1])
  buckets[#buckets + 1] = b
  weights[#weights + 1] = c * 2 ^ b
  total = total + c * 2 ^ b
end
local qsum = tonumber(redis.call('GET', P .. ':qsum'))
local probs = {}
for _ = 1, n_prio do
  for _ = 1, 200 do
    local r, i = math.random() * total, 1
    while i < #buckets and r >= weights[i] do r = r - weights[i]; i = i + 1 end
    local key = redis.call('SRANDMEMBER', P .. ':b:' .. buckets[i])
    local q = tonumber(redis.call('HGET', P .. ':q', key))
    if math.random() * 2 ^ buckets[i] < q then
      chosen[#chosen + 1] = key
      probs[#chosen] = q / qsum
      break
    end
  end
end
redis.call('HINCRBY', P .. ':stats', 'sampled', #chosen)
local out = {}
for i, key in ipairs(chosen) do
  local fresh = i <= n_chosen_fresh
  redis.call('ZREM', P .. ':fresh', key)  -- sampled once, no longer fresh
  local times = redis.call('HINCRBY', P .. ':ns', key, 1)
  out[#out + 1] = key
  out[#out + 1] = redis.call('ZSCORE', P .. ':prio', key)
  out[#out + 1] = fresh and '1' or string.format('%.17g', probs[i])
  out[#out + 1] = times
  out[#out + 1] = fresh and 1 or 0
end
return out
"""
)

# ARGV: n, then n x (key, priority, q)
_UPDATE = (
    _LUA_COMMON
    + r"""
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  local key = ARGV[2 + i * 3]
  if redis.call('ZSCORE', P .. ':prio', key) then
    redis.call('ZADD', P .. ':prio', ARGV[3 + i * 3], key)
    index_remove(key)
    index_add(key, tonumber(ARGV[4 + i * 3]))
  end
end
return n
"""
)

# ARGV: version, max_lag
_SET_VERSION = (
    _LUA_COMMON
    + r"""
redis.call('SET', P .. ':version', ARGV[1])
evict_stale(tonumber(ARGV[2]))
return 1
"""
)

# ARGV: key, max quarantine length
_QUARANTINE = (
    _LUA_COMMON
    + r"""
local payload = redis.call('GET', P .. ':g:' .. ARGV[1])
if not payload then return 0 end
redis.call('LPUSH', P .. ':quarantine', payload)
redis.call('LTRIM', P .. ':quarantine', 0, tonumber(ARGV[2]) - 1)
remove(ARGV[1])
redis.call('HINCRBY', P .. ':stats', 'corrupt', 1)
return 1
"""
)

# ARGV: field, value, field, value, ... of the caller's identity. Stores it unless the prefix is claimed already;
# returns the identity stored (the caller's on a first claim), so checking and claiming are one atomic step.
_CLAIM = r"""
local meta = KEYS[1] .. ':meta'
if redis.call('EXISTS', meta) == 0 then redis.call('HSET', meta, unpack(ARGV)) end
return redis.call('HGETALL', meta)
"""


def resolve_password(cfg: RedisReplayConfig) -> str | None:
    """The password from its one configured source, read in the calling process (never stored resolved)."""
    if cfg.password_env is not None:
        value = os.environ.get(cfg.password_env)
        if not value:
            state = "empty" if value == "" else "not set"
            raise ValueError(
                f"replay.password_env: the environment variable {cfg.password_env} is {state} on "
                f"{socket.gethostname()} (pid {os.getpid()}); set it on every node of the run"
            )
        return value
    if cfg.password_file is not None:
        path = Path(cfg.password_file).expanduser()
        if not path.is_file():
            raise ValueError(f"replay.password_file: {str(path)!r} does not exist")
        return (path.read_text().splitlines() or [""])[0].strip()
    return cfg.password.get_secret_value() if cfg.password is not None else None


def _tls_file(cfg: RedisReplayConfig, field: str) -> str | None:
    """A TLS file of the config, checked here so that a typo is not reported as a failed handshake."""
    value = getattr(cfg, field) if cfg.tls else None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"replay.{field}: {str(path)!r} does not exist")
    return str(path)


def _root_causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it was raised from or during (redis-py re-raises socket errors as the context)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def _unreachable(cfg: RedisReplayConfig, exc: redis.RedisError) -> str:
    """Why the first command failed, naming the replay fields to look at."""
    where = f"Redis at {cfg.host}:{cfg.port}"
    chain = _root_causes(exc)
    tls_error = next((e for e in chain if isinstance(e, ssl.SSLError) or "handshake" in str(e)), None)
    if cfg.tls and tls_error is not None:
        if isinstance(tls_error, ssl.SSLCertVerificationError):
            signer = "the CA in replay.tls_ca_file" if cfg.tls_ca_file else "a CA this machine trusts"
            return (
                f"replay.tls/replay.tls_ca_file: TLS handshake with {where} failed ({tls_error}); its certificate is "
                f"not signed by {signer}, or does not name {cfg.host}"
            )
        client_cert = (
            "the server refused replay.tls_cert_file (not signed by a CA it trusts?)"
            if cfg.tls_cert_file
            else "if the server requires client certificates (tls-auth-clients yes), set replay.tls_cert_file and "
            "replay.tls_key_file"
        )
        return (
            f"replay.tls/replay.tls_cert_file/replay.tls_key_file: TLS handshake with {where} failed ({tls_error}); "
            f"{client_cert}; is replay.port the server's tls-port?"
        )
    if not cfg.tls and any(isinstance(e, ConnectionResetError) or "closed by server" in str(e) for e in chain):
        return (
            f"replay.tls: {where} hung up on a plain connection ({exc}); if it serves TLS only (tls-port), set "
            "replay.tls: true and replay.tls_ca_file"
        )
    return f"replay.host/replay.port: cannot reach {where} ({exc}); is redis-server running?"


def connect(cfg: RedisReplayConfig) -> redis.Redis:
    """A client with password and TLS from the config that retries with exponential backoff on connection
    errors. Credentials, TLS and reachability are checked once up front, so a wrong password, certificate or
    address fails at once with an error naming the field instead of being retried for a minute."""
    password = resolve_password(cfg)
    ca_file, cert_file, key_file = (_tls_file(cfg, f) for f in ("tls_ca_file", "tls_cert_file", "tls_key_file"))

    def client(retry: Retry, retry_on_error: list[type[Exception]] | None = None) -> redis.Redis:
        return redis.Redis(
            host=cfg.host,
            port=cfg.port,
            db=cfg.db,
            password=password,
            ssl=cfg.tls,
            ssl_ca_certs=ca_file,
            ssl_certfile=cert_file,
            ssl_keyfile=key_file,
            socket_timeout=30,
            socket_connect_timeout=5,
            retry=retry,
            retry_on_error=retry_on_error,
        )

    probe = client(Retry(ExponentialBackoff(), retries=0))
    try:
        probe.ping()
    except redis.AuthenticationError as exc:
        source = "password_env" if cfg.password_env else "password_file" if cfg.password_file else "password"
        raise ValueError(f"replay.{source}: Redis at {cfg.host}:{cfg.port} refused the credentials ({exc})") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ConnectionError(_unreachable(cfg, exc)) from None
    finally:
        probe.close()
    return client(
        Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=20), [redis.ConnectionError, redis.TimeoutError]
    )


class RedisStore:
    def __init__(self, cfg: RedisReplayConfig, *, run_name: str = "run", client: redis.Redis | None = None) -> None:
        self.cfg = cfg
        self.prefix = f"{cfg.key_prefix}:{run_name}"
        self.client = client or connect(cfg)
        self._add = self.client.register_script(_ADD)
        self._sample = self.client.register_script(_SAMPLE)
        self._update = self.client.register_script(_UPDATE)
        self._set_version = self.client.register_script(_SET_VERSION)
        self._quarantine = self.client.register_script(_QUARANTINE)
        self._claim = self.client.register_script(_CLAIM)
        self._seed = 0
        self.success = (
            RedisStore(success_table_config(cfg), run_name=f"{run_name}:success", client=self.client)  # type: ignore[arg-type]
            if cfg.success_buffer is not None
            else None
        )

    def _k(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def claim(self, identity: Mapping[str, str]) -> None:
        """Mark this prefix as the run's (`<prefix>:meta`), or raise ValueError if another run holds it: two runs
        writing under one prefix would train on each other's groups. The same identity may claim again (a
        resumed run, a second process of the run)."""
        args = check_identity_fields(identity)
        raw = cast(list[bytes], self._claim(keys=[self.prefix], args=args))
        stored = {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}
        where = f"Redis at {self.cfg.host}:{self.cfg.port}"
        check_identity(
            stored,
            identity,
            owner=f"the replay prefix {self.prefix} on {where}",
            remedy=f"use another replay.key_prefix or run name, or delete those keys if that run is over "
            f"(redis-cli -h {self.cfg.host} -p {self.cfg.port} --scan --pattern '{self.prefix}:*' | "
            f"xargs redis-cli -h {self.cfg.host} -p {self.cfg.port} del)",
        )

    def add(self, groups: Sequence[RolloutGroup], priorities: Sequence[float] | None = None) -> list[str]:
        if priorities is None:
            known = [s.acc_estimate for s in self.prompt_stats([g.prompt_id for g in groups])]
            priorities = initial_priorities(groups, known)
        check_add_arguments(len(groups), priorities)
        keys = self._add_rows(list(zip(groups, priorities, strict=True)), offered=groups)
        if self.success is not None and self.cfg.success_buffer is not None:
            self.success._add_rows(success_inserts(groups, priorities, self.cfg.success_buffer.insert_top_k), [])
        return keys

    def _add_rows(self, rows: Sequence[tuple[RolloutGroup, float]], offered: Sequence[RolloutGroup]) -> list[str]:
        """One script call: insert `rows`, count `offered` (the rows' own groups, or none) into the prompt statistics,
        evict over capacity."""
        assert not offered or len(offered) == len(rows), "offered groups are the rows' own groups"
        args: list[bytes | str | int | float] = [
            self.cfg.capacity,
            self.cfg.eviction,
            DEDUPE_TTL_S,
            len(rows),
            len(offered),
        ]
        for group, priority in rows:
            q = float(sampling_weight(priority, self.cfg.priority_exponent))
            args += [group.group_id, encode_group(group), repr(float(priority)), repr(q), group.policy_version]
        for group in offered:
            args += [group.prompt_id, repr(group.num_correct), group.size]
        present = self._add(keys=[self.prefix], args=[*args, self.cfg.max_policy_lag])
        return [k.decode() for k in present]

    def add_encoded(self, key: str, payload: bytes, priority: float, policy_version: int) -> None:
        """Insert an already-encoded payload as is (used to prove that corrupt payloads are quarantined)."""
        q = float(sampling_weight(priority, self.cfg.priority_exponent))
        self._add(
            keys=[self.prefix],
            args=[
                self.cfg.capacity,
                self.cfg.eviction,
                DEDUPE_TTL_S,
                1,
                0,
                key,
                payload,
                repr(priority),
                repr(q),
                policy_version,
                self.cfg.max_policy_lag,
            ],
        )

    def sample(self, num_groups: int, *, num_success: int = 0, seed: int | None = None) -> SampledBatch:
        if seed is None:
            self._seed += 1
            seed = self._seed
        batch = self._sample_table(num_groups, seed)
        if num_success and self.success is not None:
            batch = batch.extended(self.success._sample_table(num_success, seed + 1))
        return batch

    def _sample_table(self, num_groups: int, seed: int) -> SampledBatch:
        n_fresh, n_prio = split_batch(num_groups, self.cfg.fresh_fraction)
        args = [n_fresh, n_prio, seed, self.cfg.max_policy_lag, self.cfg.fresh_order]
        flat = self._sample(keys=[self.prefix], args=args)
        rows = [flat[i : i + 5] for i in range(0, len(flat), 5)]
        payloads = self.client.mget([self._k(f"g:{row[0].decode()}") for row in rows]) if rows else []
        draw = Draw(
            keys=[row[0].decode() for row in rows],
            payloads=cast(list[bytes | None], payloads),  # the client returns bytes (no decode_responses)
            priorities=[float(row[1]) for row in rows],
            probabilities=[float(row[2]) for row in rows],
            times_sampled=[int(row[3]) for row in rows],
            num_fresh=sum(int(row[4]) for row in rows),  # fresh rows come first
            size=len(self),
        )
        return decode_draw(
            draw, quarantine=lambda key: self._quarantine(keys=[self.prefix], args=[key, QUARANTINE_MAX])
        )

    def update_priorities(self, keys: Sequence[str], priorities: Sequence[float]) -> None:
        args: list[str | int] = [len(keys)]
        for key, priority in zip(keys, priorities, strict=True):
            args += [key, repr(float(priority)), repr(float(sampling_weight(priority, self.cfg.priority_exponent)))]
        self._update(keys=[self.prefix], args=args)

    def set_policy_version(self, version: int) -> None:
        self._set_version(keys=[self.prefix], args=[version, self.cfg.max_policy_lag])
        if self.success is not None:
            self.success.set_policy_version(version)

    def policy_version(self) -> int:
        return int(self.client.get(self._k("version")) or 0)

    def announce_weights(self, weights: WeightVersion) -> None:
        self.client.set(self._k("weights"), encode_weight_version(weights))
        self.set_policy_version(weights.version)

    def latest_weights(self) -> WeightVersion | None:
        encoded = self.client.get(self._k("weights"))
        return decode_weight_version(cast(bytes, encoded)) if encoded is not None else None

    def put_acc_estimates(self, estimates: Mapping[str, float]) -> None:
        if estimates:
            self.client.hset(self._k("pe"), mapping={k: repr(float(v)) for k, v in estimates.items()})

    def prompt_stats(self, prompt_ids: Sequence[str]) -> list[PromptStats]:
        if not prompt_ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self._k("pc"), list(prompt_ids))
        pipe.hmget(self._k("pt"), list(prompt_ids))
        pipe.hmget(self._k("pe"), list(prompt_ids))
        correct, total, estimate = pipe.execute()
        return [
            PromptStats(
                prompt_id=pid,
                num_correct=float(c or 0.0),
                num_samples=int(t or 0),
                acc_estimate=float(e) if e is not None else None,
            )
            for pid, c, t, e in zip(prompt_ids, correct, total, estimate, strict=True)
        ]

    def stats(self) -> ReplayStats:
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self._k("prio"))
        pipe.zcard(self._k("fresh"))
        pipe.get(self._k("version"))
        pipe.hgetall(self._k("stats"))
        size, fresh, version, counters = pipe.execute()
        counts = {name: int(counters.get(name.encode(), 0)) for name in STAT_FIELDS}
        success = self.success.stats() if self.success is not None else None
        return ReplayStats(
            size=size,
            fresh=fresh,
            policy_version=int(version or 0),
            **counts,
            success_size=success.size if success is not None else 0,
            success_inserted=success.inserted if success is not None else 0,
        )

    def keys(self) -> list[str]:
        return [k.decode() for k in cast(list[bytes], self.client.zrange(self._k("order"), 0, -1))]

    def quarantined(self) -> list[bytes]:
        return cast(list[bytes], self.client.lrange(self._k("quarantine"), 0, -1))

    def clear(self) -> None:
        """Delete every key of this run (the tests' clean slate; never called by training)."""
        for key in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
            self.client.delete(key)

    def __len__(self) -> int:
        return int(self.client.zcard(self._k("prio")))

    def close(self) -> None:
        self.client.close()
