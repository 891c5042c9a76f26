//! The Lua scripts: one applies a whole [`PacketOp`] batch, one runs the
//! other writes, one reads a page of a queue with its bodies, two upgrade
//! a layout 1 prefix. Both writing
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

/// Reference counts of queued bodies: `msg:{id}` is a string that starts
/// with the number of queue entries pointing at it, in `REFS_WIDTH` (10)
/// zero-padded digits, rewritten in place with `SETRANGE`; the key goes
/// with its last reference. Also `entry_id`, the body id of a queue
/// member (`<seq>:<id>:...`).
macro_rules! refs {
    () => {
        r#"
local REFS = '%010d'
local function refs_of(k)
  return tonumber(redis.call('GETRANGE', k, 0, 9))
end
local function set_refs(k, n)
  redis.call('SETRANGE', k, 0, string.format(REFS, n))
end
-- Drop `by` references to a body; the body goes with the last one.
local function unref(id, by)
  local k = P .. 'msg:' .. id
  local left = (refs_of(k) or 0) - by
  if left <= 0 then
    redis.call('DEL', k)
  else
    set_refs(k, left)
  end
end
local function entry_id(e)
  local a = string.find(e, ':', 1, true)
  local b = a and string.find(e, ':', a + 1, true)
  if b == nil or b == a + 1 then return nil end
  return string.sub(e, a + 1, b - 1)
end
"#
    };
}

/// Apply a batch. `ARGV[1]` is the key prefix, `ARGV[2]` the lease token;
/// then each operation as a code and its arguments:
///
/// | code | arguments | operation |
/// |---|---|---|
/// | `E` | id, body, n, then n × (client, seq, member) | Enqueue |
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
    refs!(),
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

-- The member at `seq` in queue `q` (one at most: members start with their seq), or nil.
local function at(q, seq)
  return redis.call('ZRANGEBYSCORE', q, seq, seq)[1]
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
      local refs = refs_of(mk)
      if refs then
        set_refs(mk, refs + targets)
      else
        redis.call('SET', mk, string.format(REFS, targets) .. body)
      end
      for t = 0, targets - 1 do
        local q = P .. 'queue:' .. ARGV[s + 4 + 3 * t]
        local seq = ARGV[s + 5 + 3 * t]
        local old = at(q, seq)
        if old then redis.call('ZREMRANGEBYSCORE', q, seq, seq) end
        redis.call('ZADD', q, seq, ARGV[s + 6 + 3 * t])
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
    local q, seq = P .. 'queue:' .. ARGV[s + 1], ARGV[s + 2]
    local old = at(q, seq)
    if old then
      redis.call('ZREMRANGEBYSCORE', q, seq, seq)
      local oid = entry_id(old)
      if oid then unref(oid, 1) end
    end
  elseif code == 'S' then
    local q, seq = P .. 'queue:' .. ARGV[s + 1], ARGV[s + 2]
    local old = at(q, seq)
    if old then
      -- "<seq>:<id>:<state>:<delivery>": replace the state.
      local a = string.find(old, ':', 1, true)
      local b = a and string.find(old, ':', a + 1, true)
      local c = b and string.find(old, ':', b + 1, true)
      if c then
        redis.call('ZREMRANGEBYSCORE', q, seq, seq)
        redis.call('ZADD', q, seq, string.sub(old, 1, b) .. ARGV[s + 3] .. string.sub(old, c))
      end
    end
  elseif code == 'P' then
    local client = ARGV[s + 1]
    local q = P .. 'queue:' .. client
    local counts = {}
    for _, e in ipairs(redis.call('ZRANGE', q, 0, -1)) do
      local oid = entry_id(e)
      if oid then counts[oid] = (counts[oid] or 0) + 1 end
    end
    redis.call('DEL', q, P .. 'qos2in:' .. client)
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

/// Read a page of a queue. `KEYS[1]` is the queue's sorted set; `ARGV[1]`
/// the lower score bound (`-inf` or `(after`), `ARGV[2]` the page size,
/// `ARGV[3]` the prefix of body keys (`{prefix}msg:`). Returns `member,
/// body` for each entry in seq order; a missing body is nil (the caller
/// reports it as corrupt).
const READ_QUEUE: &str = r#"
local members = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
local out = {}
local chunk = 512
for first = 1, #members, chunk do
  local last = math.min(first + chunk - 1, #members)
  local keys = {}
  for k = first, last do
    local e = members[k]
    local a = string.find(e, ':', 1, true)
    local b = a and string.find(e, ':', a + 1, true)
    -- A malformed member gets a key that cannot exist; decoding it fails.
    keys[#keys + 1] = ARGV[3] .. (b and string.sub(e, a + 1, b - 1) or ':')
  end
  local bodies = redis.call('MGET', unpack(keys))
  for k = first, last do
    out[#out + 1] = members[k]
    out[#out + 1] = bodies[k - first + 1]
  end
end
return out
"#;

/// Upgrade a layout 1 queue to layout 2 (see the `upgrade` module), a
/// chunk at a time. `ARGV[1]` is the prefix, `ARGV[2]` the lease token,
/// `ARGV[3]` the client id, then the seqs to move: each entry of
/// `entries:{client}` becomes the member `<seq>:<entry>` of
/// `queue:{client}` in place of the member `<seq>`, and leaves the hash.
/// An entry whose seq is not in the queue (never read by layout 1) is
/// dropped with its reference. Returns the number moved.
const UPGRADE_QUEUE: &str = concat!(
    fence!(),
    refs!(),
    r#"
local ek = P .. 'entries:' .. ARGV[3]
local q = P .. 'queue:' .. ARGV[3]
local moved = 0
for i = 4, #ARGV do
  local seq = ARGV[i]
  local e = redis.call('HGET', ek, seq)
  if e then
    redis.call('HDEL', ek, seq)
    if redis.call('ZREM', q, seq) == 1 then
      redis.call('ZADD', q, seq, seq .. ':' .. e)
      moved = moved + 1
    else
      local id = entry_id('0:' .. e)
      if id then unref(id, 1) end
    end
  end
end
return moved
"#
);

/// Upgrade layout 1 bodies to layout 2: each key in `ARGV[3..]` that is
/// still a hash (`body`, `refs`) becomes the string `<refs><body>`.
/// `ARGV[1]` is the prefix, `ARGV[2]` the lease token. Returns the number
/// converted.
const UPGRADE_BODIES: &str = concat!(
    fence!(),
    refs!(),
    r#"
local done = 0
for i = 3, #ARGV do
  local k = ARGV[i]
  if redis.call('TYPE', k).ok == 'hash' then
    local got = redis.call('HMGET', k, 'body', 'refs')
    redis.call('DEL', k)
    local refs = tonumber(got[2])
    if got[1] and refs and refs > 0 then
      redis.call('SET', k, string.format(REFS, refs) .. got[1])
    end
    done = done + 1
  end
end
return done
"#
);

/// The scripts, hashed once.
pub(crate) struct Scripts {
    pub(crate) write: Script,
    pub(crate) guarded: Script,
    pub(crate) read_queue: Script,
    pub(crate) upgrade_queue: Script,
    pub(crate) upgrade_bodies: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            write: Script::new(WRITE),
            guarded: Script::new(GUARDED),
            read_queue: Script::new(READ_QUEUE),
            upgrade_queue: Script::new(UPGRADE_QUEUE),
            upgrade_bodies: Script::new(UPGRADE_BODIES),
        }
    }

    /// Every script, for loading them at open.
    pub(crate) fn all(&self) -> [&Script; 5] {
        [
            &self.write,
            &self.guarded,
            &self.read_queue,
            &self.upgrade_queue,
            &self.upgrade_bodies,
        ]
    }
}
