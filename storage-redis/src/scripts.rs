//! The Lua scripts: one applies a whole [`PacketOp`] batch, one runs the
//! other writes, one reads a page of a queue with its bodies. Both writing
//! scripts first check the lease token (see the `lease` module). A script runs atomically in Redis, so a batch
//! is all-or-nothing for every reader, and each costs one round trip
//! (`EVALSHA`, loaded again by the client after a server restart).
//!
//! [`PacketOp`]: broker_core::storage::PacketOp

use redis::Script;

/// Fails with `LEASELOST` unless `ARGV[2]` is the owner's token (`P owner`,
/// see the `lease` module); written into each writing script so that the
/// check and the writes are one atomic step.
macro_rules! fence {
    () => {
        r#"
local P, TOKEN = ARGV[1], ARGV[2]
local owner = redis.call('HMGET', P .. 'owner', 'token', 'host', 'pid')
if owner[1] ~= TOKEN then
  if owner[1] then
    return redis.error_reply('LEASELOST now held by host ' .. (owner[2] or '?') .. ', pid ' .. (owner[3] or '?'))
  end
  return redis.error_reply('LEASELOST its record is gone: deleted, or Redis was flushed')
end
"#
    };
}

/// Apply a batch. `ARGV[1]` is the key prefix, `ARGV[2]` the lease token;
/// then each operation as a code and its arguments:
///
/// | code | arguments | operation |
/// |---|---|---|
/// | `E` | id, body, n, then n × (client, seq, entry) | Enqueue |
/// | `R` | client, seq | Remove |
/// | `S` | client, seq, state | SetState (`""` queued, else the packet id) |
/// | `P` | client | Purge |
/// | `Q` | client, packet id | IncomingQos2Received |
/// | `L` | client, packet id | IncomingQos2Released |
/// | `W` | will id, will | StoreWill |
/// | `D` | will id | DeleteWill |
///
/// The whole argument list is checked before the first write, so a
/// malformed batch changes nothing. Returns the number of operations.
const WRITE: &str = concat!(
    fence!(),
    r#"
local n = #ARGV

-- Pass 1: find where each operation starts; no writes.
local starts = {}
local i = 3
while i <= n do
  local code = ARGV[i]
  starts[#starts + 1] = i
  if code == 'E' then
    local targets = tonumber(ARGV[i + 3])
    if targets == nil or targets < 0 then
      return redis.error_reply('BADBATCH enqueue without a target count')
    end
    i = i + 4 + 3 * targets
  elseif code == 'R' or code == 'Q' or code == 'L' or code == 'W' then
    i = i + 3
  elseif code == 'D' then
    i = i + 2
  elseif code == 'S' then
    i = i + 4
  elseif code == 'P' then
    i = i + 2
  else
    return redis.error_reply('BADBATCH unknown operation ' .. tostring(code))
  end
end
if i ~= n + 1 then
  return redis.error_reply('BADBATCH truncated batch')
end

-- The body id an entry references: the digits before its first ':'.
local function entry_id(e)
  local c = string.find(e, ':', 1, true)
  if c == nil or c == 1 then return nil end
  return string.sub(e, 1, c - 1)
end

-- Drop `by` references to a body; the body goes with the last one.
local function unref(id, by)
  local k = P .. 'msg:' .. id
  if redis.call('HINCRBY', k, 'refs', -by) <= 0 then
    redis.call('DEL', k)
  end
end

local max_id, max_id_str = nil, nil

-- Pass 2: apply in order.
for _, s in ipairs(starts) do
  local code = ARGV[s]
  if code == 'E' then
    local id, body, targets = ARGV[s + 1], ARGV[s + 2], tonumber(ARGV[s + 3])
    if targets > 0 then
      local mk = P .. 'msg:' .. id
      -- A body already stored (a hand-over) is kept, never replaced.
      redis.call('HSETNX', mk, 'body', body)
      redis.call('HINCRBY', mk, 'refs', targets)
      for t = 0, targets - 1 do
        local client = ARGV[s + 4 + 3 * t]
        local seq = ARGV[s + 5 + 3 * t]
        local ek = P .. 'entries:' .. client
        local old = redis.call('HGET', ek, seq)
        redis.call('HSET', ek, seq, ARGV[s + 6 + 3 * t])
        redis.call('ZADD', P .. 'queue:' .. client, seq, seq)
        if old then
          local oid = entry_id(old)
          if oid then unref(oid, 1) end
        end
      end
    end
    local num = tonumber(id)
    if num and (max_id == nil or num > max_id) then
      max_id, max_id_str = num, id
    end
  elseif code == 'R' then
    local client, seq = ARGV[s + 1], ARGV[s + 2]
    local ek = P .. 'entries:' .. client
    local old = redis.call('HGET', ek, seq)
    if old then
      redis.call('HDEL', ek, seq)
      redis.call('ZREM', P .. 'queue:' .. client, seq)
      local oid = entry_id(old)
      if oid then unref(oid, 1) end
    end
  elseif code == 'S' then
    local ek, seq = P .. 'entries:' .. ARGV[s + 1], ARGV[s + 2]
    local old = redis.call('HGET', ek, seq)
    if old then
      -- "<id>:<state>:<delivery>": replace the state, in place.
      local a = string.find(old, ':', 1, true)
      local b = a and string.find(old, ':', a + 1, true)
      if b then
        redis.call('HSET', ek, seq, string.sub(old, 1, a) .. ARGV[s + 3] .. string.sub(old, b))
      end
    end
  elseif code == 'P' then
    local client = ARGV[s + 1]
    local ek = P .. 'entries:' .. client
    local counts = {}
    for _, e in ipairs(redis.call('HVALS', ek)) do
      local oid = entry_id(e)
      if oid then counts[oid] = (counts[oid] or 0) + 1 end
    end
    redis.call('DEL', ek, P .. 'queue:' .. client, P .. 'qos2in:' .. client)
    for oid, k in pairs(counts) do unref(oid, k) end
  elseif code == 'Q' then
    redis.call('SADD', P .. 'qos2in:' .. ARGV[s + 1], ARGV[s + 2])
  elseif code == 'W' then
    redis.call('HSET', P .. 'wills', ARGV[s + 1], ARGV[s + 2])
  elseif code == 'D' then
    redis.call('HDEL', P .. 'wills', ARGV[s + 1])
  else -- 'L'
    redis.call('SREM', P .. 'qos2in:' .. ARGV[s + 1], ARGV[s + 2])
  end
end

if max_id ~= nil then
  local lk = P .. 'last_message_id'
  local cur = tonumber(redis.call('GET', lk) or '0') or 0
  if max_id > cur then
    redis.call('SET', lk, max_id_str)
  end
end
return #starts
"#
);

/// Run plain commands if we own the prefix: the subscription and retained
/// writes. `ARGV[1]` is the prefix, `ARGV[2]` the lease token, `ARGV[3]` a
/// message id to raise `last_message_id` to (empty for none: retained
/// messages take ids from the same counter, and live nowhere else); then
/// each command as its argument count and arguments (full key names).
/// Checked whole before the first write. Returns the number of commands.
const GUARDED: &str = concat!(
    fence!(),
    r#"
local n = #ARGV
local i = 4
local starts = {}
while i <= n do
  local count = tonumber(ARGV[i])
  if count == nil or count < 1 or i + count > n then
    return redis.error_reply('BADBATCH malformed command list')
  end
  starts[#starts + 1] = i
  i = i + 1 + count
end
for _, s in ipairs(starts) do
  redis.call(unpack(ARGV, s + 1, s + tonumber(ARGV[s])))
end
local id = tonumber(ARGV[3])
if id then
  local lk = P .. 'last_message_id'
  local cur = tonumber(redis.call('GET', lk) or '0') or 0
  if id > cur then redis.call('SET', lk, ARGV[3]) end
end
return #starts
"#
);

/// Read a page of a queue. `KEYS[1]` is the queue's sorted set, `KEYS[2]`
/// its entries hash; `ARGV[1]` the lower score bound (`-inf` or `(after`),
/// `ARGV[2]` the page size, `ARGV[3]` the prefix of body keys
/// (`{prefix}msg:`). Returns `seq, entry, body` for each entry in seq
/// order; a missing entry or body is nil (the caller reports it as corrupt).
const READ_QUEUE: &str = r#"
local seqs = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
local out = {}
local chunk = 512
for first = 1, #seqs, chunk do
  local last = math.min(first + chunk - 1, #seqs)
  local entries = redis.call('HMGET', KEYS[2], unpack(seqs, first, last))
  for k = first, last do
    local e = entries[k - first + 1]
    local body = false
    if e then
      local c = string.find(e, ':', 1, true)
      if c and c > 1 then
        body = redis.call('HGET', ARGV[3] .. string.sub(e, 1, c - 1), 'body')
      end
    end
    out[#out + 1] = seqs[k]
    out[#out + 1] = e
    out[#out + 1] = body
  end
end
return out
"#;

/// The scripts, hashed once.
pub(crate) struct Scripts {
    pub(crate) write: Script,
    pub(crate) guarded: Script,
    pub(crate) read_queue: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            write: Script::new(WRITE),
            guarded: Script::new(GUARDED),
            read_queue: Script::new(READ_QUEUE),
        }
    }

    /// Every script, for loading them at open.
    pub(crate) fn all(&self) -> [&Script; 3] {
        [&self.write, &self.guarded, &self.read_queue]
    }
}
