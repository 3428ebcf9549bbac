-- Stagecraft's run store on Redis: every state change of a run is one operation of this
-- library, so each is atomic, and every worker write checks the run's fencing token in the same
-- call.
--
-- It is loaded as a Redis function library (FUNCTION LOAD; the store adds the `#!lua` line and
-- registers `batch` under a name carrying a hash of this text, so versions side by side never
-- replace each other). A library's body runs once, at load: its helpers and caches live across
-- calls, and a call only runs `batch`, so nothing is rebuilt per call. Per-call state is reset at
-- the start of each call.
--
-- One call carries a batch of operations: args[1] is the key prefix, args[2] 'batch', then for
-- each operation its name, its argument count and its arguments. The answer holds one result per
-- operation, in order. Batching lets many concurrent runs share one call, and the indexes
-- (status sets, counts, leases, wake lists) are written once per call at its end instead of once
-- per run, so their cost is shared by every run of the batch.
--
-- A run is one hash; its stages' fields are in it as `s{index}:{field}`. The fields the hot
-- operations read and write come first and always exist (empty when unset: an empty field means
-- an absent value), because Redis looks fields of a small hash up by scanning it from the start.
-- The hot path (claim, commit) therefore reads and writes each run with one HMGET and one HSET.
--
-- What a change does to a run (its statuses, the fields it clears, the events it appends) is
-- decided by the core's state machine, in Rust: the operations receive those decisions as
-- arguments and apply them, after checking the run is still as the decision assumed (its fence,
-- its status or its lease). The frozen names of statuses and event kinds the library writes by
-- itself come from the constants the store prepends to this text (`EV`, `RS`, `SS`).
--
-- Times come from the Redis server's clock (TIME), so processes on different hosts agree on
-- lease expiry. The work of every operation is bounded: claims look at the head of each queue,
-- sweeps and purges take a limit.

-- Set at the start of each call: the key prefix and the server's time (ms, and as text).
local PREFIX, now, NOW, EV_HEAD
-- Arguments of redis.call are passed as strings: Redis formats a Lua number with printf on every
-- use, which costs more than the command itself.
local function str(n) return string.format('%d', n) end

local function k_run(id) return PREFIX .. 'run:' .. id end
local function k_steps(id) return PREFIX .. 'run:' .. id .. ':steps' end
local function k_events(id) return PREFIX .. 'run:' .. id .. ':events' end
local function k_due(q) return PREFIX .. 'queue:' .. q .. ':due' end
local function k_wake(q) return PREFIX .. 'queue:' .. q .. ':wake' end
local function k_status(s) return PREFIX .. 'status:' .. s end
-- The listing's indexes of run ids by kind, name and queue (all scored 0: ordered by id).
local function k_by(field, value) return PREFIX .. 'by:' .. field .. ':' .. value end
local K_ALL, K_LEASES, K_COUNTS, K_FINISHED
local function k_idem(key) return PREFIX .. 'idempotency:' .. key end

local FINISHED = { [RS.completed] = true, [RS.failed] = true, [RS.cancelled] = true }
-- The first element of the answer of an operation that failed (the store reads it).
local OP_ERROR = '!error'
-- Wake-list entries kept at most per queue (the list only wakes blocked workers).
local WAKE_CAP = 64

-- The field names of stage `i`, built once per stage index (kept across calls).
local STAGE_FIELDS = {}
local function stage_fields(i)
  local f = STAGE_FIELDS[i]
  if not f then
    local p = 's' .. i .. ':'
    f = {
      name = p .. 'name', status = p .. 'status', attempts = p .. 'attempts',
      started_at = p .. 'started_at', finished_at = p .. 'finished_at', output = p .. 'output',
      artifacts = p .. 'artifacts', cost = p .. 'cost_micros', error = p .. 'error',
      -- Costs written in dollars before they were kept in micro-dollars.
      legacy_cost = p .. 'cost_usd',
      next_attempt_at = p .. 'next_attempt_at', progress_done = p .. 'progress_done',
      progress_total = p .. 'progress_total', reused_from = p .. 'reused_from',
    }
    STAGE_FIELDS[i] = f
  end
  return f
end

---------------------------------------------------------------------------------------------
-- Index changes of this call, written by flush() (and reset at the start of every call, so an
-- operation that failed half-way leaves nothing behind for the next call).

local moved = {}      -- run id -> its index in the three arrays below
local moved_ids, moved_q, moved_old, moved_new = {}, {}, {}, {}
local leases = {}     -- run id -> lease expiry, or false when the lease is gone
local lease_ids = {}
local added = {}      -- runs created by this call
local listed = {}     -- listing index key -> {'0', id, '0', id, ...} of the runs created
local wakes = {}      -- queue -> runs that became due now

-- Forgets the index changes recorded so far (written, or left by a call that failed).
local function forget()
  moved, moved_ids, moved_q, moved_old, moved_new = {}, {}, {}, {}, {}
  leases, lease_ids, added, wakes, listed = {}, {}, {}, {}, {}
end

-- Records a status change for the status sets, the counts and the finished index.
local function move(id, q, old, new)
  local m = moved[id]
  if not m then
    m = #moved_ids + 1
    moved[id] = m
    moved_ids[m], moved_q[m], moved_old[m] = id, q, old or false
  end
  moved_new[m] = new
end

local function lease(id, expires)
  if leases[id] == nil then lease_ids[#lease_ids + 1] = id end
  leases[id] = expires
end

local function wake(q)
  wakes[q] = (wakes[q] or 0) + 1
end

-- Appends its other arguments (none of them nil) to `list`.
local function append(list, ...)
  for _, v in ipairs({ ... }) do list[#list + 1] = v end
end

local function push_to(map, key, a, b)
  local list = map[key]
  if not list then
    list = {}
    map[key] = list
  end
  list[#list + 1] = a
  if b then list[#list + 1] = b end
end

-- Writes the index changes recorded so far, one command per index touched.
local function flush()
  local rem, add, counts = {}, {}, {}
  local fin_add, fin_rem = {}, {}
  for m, id in ipairs(moved_ids) do
    local q, old, new = moved_q[m], moved_old[m], moved_new[m]
    if old ~= new then
      local c = counts[q]
      if not c then
        c = {}
        counts[q] = c
      end
      -- Running runs are the lease index; they have no status set of their own.
      if old then
        if old ~= RS.running then push_to(rem, old, id) end
        c[old] = (c[old] or 0) - 1
      end
      if new ~= RS.running then push_to(add, new, '0', id) end
      c[new] = (c[new] or 0) + 1
      local was, is = old and FINISHED[old], FINISHED[new]
      if is and not was then
        fin_add[#fin_add + 1] = NOW
        fin_add[#fin_add + 1] = id
      elseif was and not is then
        fin_rem[#fin_rem + 1] = id
      end
    end
  end
  for s, ids in pairs(rem) do redis.call('ZREM', k_status(s), unpack(ids)) end
  for s, pairs_ in pairs(add) do redis.call('ZADD', k_status(s), unpack(pairs_)) end
  for q, c in pairs(counts) do
    for status, delta in pairs(c) do
      if delta ~= 0 then redis.call('HINCRBY', K_COUNTS, q .. ':' .. status, str(delta)) end
    end
  end
  if #fin_add > 0 then redis.call('ZADD', K_FINISHED, unpack(fin_add)) end
  if #fin_rem > 0 then redis.call('ZREM', K_FINISHED, unpack(fin_rem)) end
  local lease_add, lease_rem = {}, {}
  for _, id in ipairs(lease_ids) do
    local expires = leases[id]
    if expires then
      lease_add[#lease_add + 1] = expires
      lease_add[#lease_add + 1] = id
    else
      lease_rem[#lease_rem + 1] = id
    end
  end
  if #lease_add > 0 then redis.call('ZADD', K_LEASES, unpack(lease_add)) end
  if #lease_rem > 0 then redis.call('ZREM', K_LEASES, unpack(lease_rem)) end
  if #added > 0 then
    local members = {}
    for _, id in ipairs(added) do
      members[#members + 1] = '0'
      members[#members + 1] = id
    end
    redis.call('ZADD', K_ALL, unpack(members))
    for key, pairs_ in pairs(listed) do redis.call('ZADD', key, unpack(pairs_)) end
  end
  for q, n in pairs(wakes) do
    local tokens = {}
    for i = 1, math.min(n, WAKE_CAP) do tokens[i] = '1' end
    redis.call('LPUSH', k_wake(q), unpack(tokens))
    redis.call('LTRIM', k_wake(q), 0, WAKE_CAP - 1)
  end
  forget()
end

---------------------------------------------------------------------------------------------
-- Helpers.

-- An event as stored: its sequence number is its position in the run's list (1-based), so it
-- needs no counter of its own. `stage` is a name or nil.
local STAGE_JSON = {} -- stage name -> its JSON string, encoded once per call
local function event_entry(kind, stage, data)
  if stage and stage ~= '' then
    local json = STAGE_JSON[stage]
    if not json then
      json = cjson.encode(stage)
      STAGE_JSON[stage] = json
    end
    return EV_HEAD .. kind .. '","stage":' .. json .. ',"data":' .. data .. '}'
  end
  return EV_HEAD .. kind .. '","stage":null,"data":' .. data .. '}'
end

local function event(id, kind, stage, data)
  redis.call('RPUSH', k_events(id), event_entry(kind, stage, data))
end

-- Appends the events the store decided: `n`, then the kind, whether it names the stage (1|0)
-- and the data of each; `stage` is the name of the stage the change is about.
local function events_in(id, stage, n, ...)
  local a, list = { ... }, {}
  for j = 0, tonumber(n) - 1 do
    local kind, on_stage, data = a[3 * j + 1], a[3 * j + 2], a[3 * j + 3]
    list[#list + 1] = event_entry(kind, on_stage == '1' and stage or nil, data)
  end
  if #list > 0 then redis.call('RPUSH', k_events(id), unpack(list)) end
end

-- Adds a cost in micro-dollars to a stage and its run (integers: sums are exact), skipping the
-- commands when there is nothing to add.
local function add_cost(r, f, micros)
  if micros ~= '0' then
    redis.call('HINCRBY', r, f.cost, micros)
    redis.call('HINCRBY', r, 'cost_micros', micros)
  end
end

-- Sets a run's status. `old` and `q` are read when the caller does not know them.
local function set_status(id, new, old, q)
  local r = k_run(id)
  if not q then
    local v = redis.call('HMGET', r, 'status', 'queue')
    old, q = v[1], v[2]
  end
  local was, is = old and FINISHED[old], FINISHED[new]
  if is and not was then
    redis.call('HSET', r, 'status', new, 'updated_at', NOW, 'finished_at', NOW)
  elseif was and not is then
    redis.call('HSET', r, 'status', new, 'updated_at', NOW, 'finished_at', '')
  else
    redis.call('HSET', r, 'status', new, 'updated_at', NOW)
  end
  move(id, q, old, new)
end

-- Gives up the run's lease (and a stage start its claim made).
local function release(id)
  redis.call('HSET', k_run(id), 'lease_owner', '', 'lease_expires_at', '')
  lease(id, false)
end

local function enqueue(id, at, q)
  q = q or redis.call('HGET', k_run(id), 'queue')
  redis.call('HSET', k_run(id), 'available_at', str(at))
  redis.call('ZADD', k_due(q), str(at), id)
  if at <= now then wake(q) end
end

-- The run's fence and lease owner with `extra` fields after them, or nil when the caller's
-- fence is not the current one.
local function fenced(id, fence, owner, ...)
  local v = redis.call('HMGET', k_run(id), 'fence', 'lease_owner', ...)
  if v[1] == fence and v[2] == owner then return v end
  return nil
end

-- Clears the fields a failed attempt of stage `f` left, when there are any.
local function clear_attempt(r, f, v_finished, v_error, v_next)
  if (v_finished and v_finished ~= '') or v_error or v_next then
    redis.call('HDEL', r, f.error, f.next_attempt_at)
    redis.call('HSET', r, f.finished_at, '')
  end
end

---------------------------------------------------------------------------------------------
-- Operations. Each takes its arguments as Lua arguments and answers one value (never nil).

local OPS = {}

-- insert id kind name queue inputs mode budget idem request_hash reuse(0|1) n names... events:
-- {id, 1, created_at, ''} for a new run, {id of the run with this idempotency key, 0, 0, the
-- request hash it was created with} otherwise. A key lives as long as its run (purge deletes
-- it with the run).
function OPS.insert(id, kind, name, q, inputs, mode, budget, idem, request_hash, reuse, n, ...)
  local rest = { ... }
  local count = tonumber(n)
  if idem ~= '' then
    local existing = redis.call('GET', k_idem(idem))
    if existing then
      return { existing, 0, 0, redis.call('HGET', k_run(existing), 'request_hash') or '' }
    end
    redis.call('SET', k_idem(idem), id)
  end
  -- Hot fields first (see the top). `next` is the first stage without a checkpoint.
  local fields = { 'status', RS.queued, 'fence', '0', 'lease_owner', '', 'lease_expires_at', '',
    'next', '0', 'stages', n, 'queue', q, 'updated_at', NOW, 'cancel_requested', '0',
    'budget_micros', budget, 'reuse', reuse, 'current_stage', '', 'worker', '', 'result', '' }
  for i = 0, count - 1 do
    local f = stage_fields(i)
    append(fields, f.name, rest[i + 1], f.status, SS.pending, f.attempts, '0', f.started_at, '',
      f.finished_at, '', f.output, '', f.artifacts, '')
  end
  append(fields, 'finished_at', '', 'id', id, 'kind', kind, 'name', name, 'inputs', inputs,
    'provider_mode', mode, 'cost_micros', '0', 'created_at', NOW, 'available_at', NOW,
    'idempotency_key', idem, 'request_hash', request_hash)
  redis.call('HSET', k_run(id), unpack(fields))
  added[#added + 1] = id
  push_to(listed, k_by('kind', kind), '0', id)
  push_to(listed, k_by('name', name), '0', id)
  push_to(listed, k_by('queue', q), '0', id)
  move(id, q, nil, RS.queued)
  redis.call('ZADD', k_due(q), NOW, id)
  wake(q)
  events_in(id, nil, unpack(rest, count + 1))
  return { id, 1, now, '' }
end

-- Claims one due run for `worker`: {id, fence, started, attempt, recovered}, or nil when the
-- run is gone. Its lease and status are recorded right after its hash is written, so a later
-- failure (its event list of the wrong type) still leaves it leased, to be recovered.
local function claim_one(worker, expires, run_started, q, id, floor)
  local r = k_run(id)
  -- Most runs start at stage 0: read its fields in the same command.
  local v = redis.call('HMGET', r, 'status', 'fence', 'next', 'stages', 'cancel_requested',
    'budget_micros', 'reuse', 's0:name', 's0:status', 's0:attempts', 'budget_usd')
  if not v[1] then return nil end
  -- Above every token an earlier primary granted (see the floor in OPS.claim).
  local fence = str(math.max(tonumber(v[2]) + 1, floor))
  local idx, n = tonumber(v[3]), tonumber(v[4])
  local name, status, attempts = v[8], v[9], v[10]
  if idx ~= 0 and idx < n then
    local f = stage_fields(idx)
    local s = redis.call('HMGET', r, f.name, f.status, f.attempts)
    name, status, attempts = s[1], s[2], s[3]
  end
  local recovered = status == SS.running and 1 or 0
  local data = run_started .. fence .. '}'
  local attempt = 0
  if idx < n and v[5] ~= '1' and (v[6] or '') == '' and (v[11] or '') == '' and v[7] ~= '1' then
    local f = stage_fields(idx)
    attempt = tonumber(attempts or '0') + 1
    redis.call('HSET', r, 'status', RS.running, 'fence', fence, 'lease_owner', worker,
      'lease_expires_at', expires, 'updated_at', NOW, 'current_stage', name, 'worker', worker, f.status, SS.running, f.attempts, str(attempt),
      f.started_at, NOW)
    lease(id, expires)
    move(id, q, v[1], RS.running)
    -- A retry's error and due time stay on the stage until its next attempt starts.
    if v[1] == RS.retrying then redis.call('HDEL', r, f.error, f.next_attempt_at) end
    redis.call('RPUSH', k_events(id), event_entry(EV.run_started, nil, data),
      event_entry(EV.stage_started, name, '{"attempt":' .. str(attempt) .. '}'))
  else
    idx = -1
    redis.call('HSET', r, 'status', RS.running, 'fence', fence, 'lease_owner', worker,
      'lease_expires_at', expires, 'updated_at', NOW, 'worker', worker)
    lease(id, expires)
    move(id, q, v[1], RS.running)
    event(id, EV.run_started, nil, data)
  end
  -- The client reads the run's hash itself, outside the script: much cheaper for Redis.
  return { id, fence, idx, attempt, recovered }
end

-- claim worker ttl_ms max floor queues...: up to max due runs, oldest first, as
-- {id, fence, started, attempt, recovered}. The claim also starts the run's first open stage
-- (started = its index, attempt = its attempt number; -1 and 0 when it did not) unless a cancel
-- was requested or the run has a budget or reuses checkpoints: then the worker checks first.
-- recovered is 1 when that stage was running under an earlier lease.
-- A new fencing token is at least floor: the Sentinel epoch of the primary the worker found,
-- shifted left 32 bits, so a token granted under a new primary is above every token granted
-- under an earlier one, including a grant that was lost with it.
function OPS.claim(worker, ttl, max_text, floor_text, ...)
  local max = tonumber(max_text)
  local floor = tonumber(floor_text) or 0
  local expires = str(now + tonumber(ttl))
  local run_started = '{"worker":' .. cjson.encode(worker) .. ',"fence":'
  local queues = { ... }
  -- The due runs to take, oldest first: ids[i] of queue qs[i].
  local ids, qs = {}, {}
  local heads = {}
  for _, q in ipairs(queues) do
    local head = redis.call('ZRANGEBYSCORE', k_due(q), '-inf', NOW, 'LIMIT', '0', max_text)
    if #head > 0 then heads[#heads + 1] = { q, head } end
  end
  if #heads == 1 then
    -- One queue has due runs (the usual case): its head is in order already.
    ids = heads[1][2]
    for j = 1, #ids do qs[j] = heads[1][1] end
  elseif #heads > 1 then
    -- Several: merge their heads by due time (scores only cross the bridge here).
    local candidates = {}
    for _, h in ipairs(heads) do
      local scores = redis.call('ZMSCORE', k_due(h[1]), unpack(h[2]))
      for j, id in ipairs(h[2]) do
        candidates[#candidates + 1] = { h[1], id, tonumber(scores[j]) }
      end
    end
    table.sort(candidates, function(x, y)
      if x[3] ~= y[3] then return x[3] < y[3] end
      return x[2] < y[2]
    end)
    for j = 1, math.min(max, #candidates) do
      qs[j], ids[j] = candidates[j][1], candidates[j][2]
    end
  end
  local taken = {}
  local claimed = {}
  for i = 1, math.min(max, #ids) do
    local q, id = qs[i], ids[i]
    push_to(taken, q, id)
    -- A run whose data cannot be read or written (a key of the wrong type) is set aside in the
    -- quarantine set instead of failing the claim of the others or blocking its queue.
    local ok, one = pcall(claim_one, worker, expires, run_started, q, id, floor)
    if not ok then
      local message = type(one) == 'table' and one.err or tostring(one)
      redis.log(redis.LOG_WARNING, 'stagecraft: run ' .. id .. ' quarantined: ' .. tostring(message))
      redis.pcall('ZADD', PREFIX .. 'quarantine', NOW, id)
    elseif one then
      local c = #claimed
      claimed[c + 1], claimed[c + 2], claimed[c + 3], claimed[c + 4], claimed[c + 5] =
        one[1], one[2], one[3], one[4], one[5]
    end
  end
  for q, ids in pairs(taken) do redis.call('ZREM', k_due(q), unpack(ids)) end
  return claimed
end

-- get id: the run's hash as a flat field/value list, with `event_seq` (the length of its event
-- list) after it: one snapshot ({} when there is no run)
function OPS.get(id)
  local fields = redis.call('HGETALL', k_run(id))
  if #fields > 0 then
    fields[#fields + 1] = 'event_seq'
    fields[#fields + 1] = str(redis.call('LLEN', k_events(id)))
  end
  return fields
end

-- next_due queues...: milliseconds until the earliest run of these queues is due (-1: none)
function OPS.next_due(...)
  local best = nil
  for _, q in ipairs({ ... }) do
    local head = redis.call('ZRANGE', k_due(q), 0, 0, 'WITHSCORES')
    if head[1] and (not best or tonumber(head[2]) < best) then best = tonumber(head[2]) end
  end
  if not best then return -1 end
  return math.max(best - now, 0)
end

-- Operations of the lease holder: id fence owner ... ; answer -1 when the fence is stale.

-- heartbeat id fence owner ttl_ms: 1 when a cancel was requested, else 0
function OPS.heartbeat(id, fence, owner, ttl)
  local v = fenced(id, fence, owner, 'cancel_requested')
  if not v then return -1 end
  local expires = str(now + tonumber(ttl))
  redis.call('HSET', k_run(id), 'lease_expires_at', expires)
  lease(id, expires)
  return tonumber(v[3])
end

-- start_stage id fence owner idx: the attempt number. (A stage the claim started is answered by
-- the client without calling this.)
function OPS.start_stage(id, fence, owner, idx)
  local f = stage_fields(idx)
  local v = fenced(id, fence, owner, f.name, f.attempts, f.finished_at, f.error, f.next_attempt_at)
  if not v then return -1 end
  local r = k_run(id)
  local name, attempts = v[3], tonumber(v[4] or '0') + 1
  -- The claim made the run 'running'; only the current stage changes.
  redis.call('HSET', r, f.attempts, str(attempts), f.status, SS.running, f.started_at, NOW,
    'current_stage', name, 'updated_at', NOW)
  clear_attempt(r, f, v[5], v[6], v[7])
  event(id, EV.stage_started, name, '{"attempt":' .. str(attempts) .. '}')
  return attempts
end

-- record_step id fence owner idx key step_json cost done total events: 0 when known already
function OPS.record_step(id, fence, owner, idx, key, step, cost, done, total, ...)
  local f = stage_fields(idx)
  local v = fenced(id, fence, owner, f.name)
  if not v then return -1 end
  if redis.call('HSETNX', k_steps(id), idx .. ':' .. key, step) == 0 then return 0 end
  local r = k_run(id)
  add_cost(r, f, cost)
  redis.call('HSET', r, f.progress_done, done, f.progress_total, total, 'updated_at', NOW)
  events_in(id, v[3], ...)
  return 1
end

-- commit id fence owner idx output artifacts cost result reused_from run_status events
-- (result and run_status '' when the commit does not complete the run; reused_from '' unless
-- the checkpoint came from another run). A stage's error and retry time were cleared when its
-- attempt started, and a run in progress has no error, so there is nothing to delete.
function OPS.commit(id, fence, owner, idx, output, artifacts, cost, result, reused_from, run_status, ...)
  local f = stage_fields(idx)
  local v = fenced(id, fence, owner, 'status', 'queue', f.name)
  if not v then return -1 end
  local r = k_run(id)
  local name = v[5]
  local next_idx = str(tonumber(idx) + 1)
  add_cost(r, f, cost)
  if reused_from ~= '' then redis.call('HSET', r, f.reused_from, reused_from) end
  if run_status == '' then
    redis.call('HSET', r, 'next', next_idx, 'updated_at', NOW, f.status, SS.completed,
      f.finished_at, NOW, f.output, output, f.artifacts, artifacts)
  else
    redis.call('HSET', r, 'status', run_status, 'lease_owner', '', 'lease_expires_at', '',
      'next', next_idx, 'updated_at', NOW, 'current_stage', '', f.status,
      SS.completed, f.finished_at, NOW, 'finished_at', NOW, f.output, output, f.artifacts,
      artifacts, 'result', result)
    lease(id, false)
    move(id, v[4], v[3], run_status)
  end
  events_in(id, name, ...)
  return 1
end

-- end_attempt id fence owner idx stage_status run_status stage_error run_error stage_finished
-- next_attempt_ms due_ms unstart events: the attempt ends as decided: the stage's status, its
-- error ('' clears it), its finish time (stage_finished 1) and next attempt ('' clears it); the
-- run's status, its error ('' keeps it), and when it is due again ('' when it is not). With
-- unstart 1, a stage the claim started is given back before it ran: its attempt is not counted.
function OPS.end_attempt(id, fence, owner, idx, stage_status, run_status, stage_error, run_error,
                         stage_finished, next_attempt, due, unstart, ...)
  local f = stage_fields(idx)
  local v = fenced(id, fence, owner, 'status', 'queue', f.name, f.attempts)
  if not v then return -1 end
  local r = k_run(id)
  local old, q, name = v[3], v[4], v[5]
  release(id)
  local sets, dels = { f.status, stage_status }, {}
  if stage_error ~= '' then append(sets, f.error, stage_error) else append(dels, f.error) end
  if stage_finished == '1' then append(sets, f.finished_at, NOW) end
  if next_attempt ~= '' then
    append(sets, f.next_attempt_at, str(now + tonumber(next_attempt)))
  else
    append(dels, f.next_attempt_at)
  end
  if unstart == '1' then
    append(sets, f.attempts, str(math.max(tonumber(v[6] or '0') - 1, 0)), f.started_at, '')
  end
  if run_error ~= '' then append(sets, 'error', run_error) end
  redis.call('HSET', r, unpack(sets))
  if #dels > 0 then redis.call('HDEL', r, unpack(dels)) end
  set_status(id, run_status, old, q)
  if due ~= '' then enqueue(id, now + tonumber(due), q) end
  events_in(id, name, ...)
  return 1
end

-- fail_run id fence owner error run_status unstart_idx events: with unstart_idx, the stage the
-- claim started is given back unrun ('' when there is none).
function OPS.fail_run(id, fence, owner, err, run_status, unstart_idx, ...)
  local v = fenced(id, fence, owner)
  if not v then return -1 end
  local idx = tonumber(unstart_idx)
  if idx then
    local f = stage_fields(idx)
    local attempts = tonumber(redis.call('HGET', k_run(id), f.attempts) or '1')
    redis.call('HSET', k_run(id), f.status, SS.pending, f.attempts, str(math.max(attempts - 1, 0)),
      f.started_at, '', 'current_stage', '')
  end
  release(id)
  redis.call('HSET', k_run(id), 'error', err)
  set_status(id, run_status)
  events_in(id, nil, ...)
  return 1
end

-- The statuses of a run's stages, from 0.
local function stage_statuses(r, n)
  if n == 0 then return {} end
  local fields = {}
  for i = 0, n - 1 do fields[i + 1] = stage_fields(i).status end
  return redis.call('HMGET', r, unpack(fields))
end

-- cancel id expected_status now(1|0) run_status events: 'ok' | 'changed' | 'missing'. A run
-- still in the status the decision was made for is cancelled at once (now 1: its status set,
-- its retrying stages cancelled, it leaves its queue) or flagged for its worker (now 0).
function OPS.cancel(id, expected, at_once, run_status, ...)
  local r = k_run(id)
  local v = redis.call('HMGET', r, 'status', 'queue', 'stages')
  local status, q = v[1], v[2]
  if not status then return 'missing' end
  if status ~= expected then return 'changed' end
  if at_once == '1' then
    redis.call('ZREM', k_due(q), id)
    redis.call('HSET', r, 'cancel_requested', '1')
    for i, stage_status in ipairs(stage_statuses(r, tonumber(v[3] or '0'))) do
      if stage_status == SS.retrying then
        local f = stage_fields(i - 1)
        redis.call('HSET', r, f.status, SS.cancelled, f.finished_at, NOW)
        redis.call('HDEL', r, f.next_attempt_at)
      end
    end
    set_status(id, run_status, status, q)
  else
    redis.call('HSET', r, 'cancel_requested', '1', 'updated_at', NOW)
  end
  events_in(id, nil, ...)
  return 'ok'
end

-- resume id expected_status from_idx forget_steps(0|1) inputs budget run_status events:
-- 'ok' | 'changed' | 'missing' (inputs and budget '' when unchanged)
function OPS.resume(id, expected, from_text, forget, inputs, budget, run_status, ...)
  local from = tonumber(from_text)
  local r = k_run(id)
  local v = redis.call('HMGET', r, 'status', 'queue', 'stages')
  local status, q = v[1], v[2]
  if not status then return 'missing' end
  if status ~= expected then return 'changed' end
  local n = tonumber(v[3] or '0')
  local steps = {}
  if forget == '1' then steps = redis.call('HKEYS', k_steps(id)) end
  for i = from, n - 1 do
    local f = stage_fields(i)
    redis.call('HSET', r, f.status, SS.pending, f.attempts, '0', f.started_at, '', f.finished_at, '')
    if i == from and forget ~= '1' then
      -- The stage keeps its memoised steps, and with them their cost and progress.
      redis.call('HDEL', r, f.output, f.error, f.next_attempt_at, f.reused_from)
    else
      redis.call('HDEL', r, f.cost, f.legacy_cost, f.artifacts, f.output, f.error, f.progress_done,
        f.progress_total, f.next_attempt_at, f.reused_from)
    end
    if forget == '1' then
      local mark = i .. ':'
      for _, field in ipairs(steps) do
        if string.sub(field, 1, #mark) == mark then redis.call('HDEL', k_steps(id), field) end
      end
    end
  end
  redis.call('HDEL', r, 'result', 'error')
  redis.call('HSET', r, 'cancel_requested', '0', 'next', str(from), 'current_stage', '',
    'lease_owner', '', 'lease_expires_at', '')
  if inputs ~= '' then redis.call('HSET', r, 'inputs', inputs) end
  if budget ~= '' then
    redis.call('HSET', r, 'budget_micros', budget)
    redis.call('HDEL', r, 'budget_usd')
  end
  lease(id, false)
  set_status(id, run_status, status, q)
  enqueue(id, now, q)
  events_in(id, redis.call('HGET', r, stage_fields(from).name), ...)
  return 'ok'
end

-- expire id expires run_status requeue(1|0) events: 1 when the run's lease, read as `expires`,
-- is still that lease and expired: the run gets the status decided for it (queued again, due
-- now, with requeue 1); 0 when it changed meanwhile (renewed, released, finished).
function OPS.expire(id, expires, run_status, requeue, ...)
  local r = k_run(id)
  local v = redis.call('HMGET', r, 'status', 'lease_expires_at', 'queue')
  if v[1] ~= RS.running or v[2] ~= expires or (tonumber(v[2]) or 0) >= now then
    if not v[1] or v[1] ~= RS.running then lease(id, false) end
    return 0
  end
  redis.call('HSET', r, 'lease_owner', '', 'lease_expires_at', '')
  lease(id, false)
  set_status(id, run_status, v[1], v[3])
  if requeue == '1' then enqueue(id, now, v[3]) end
  events_in(id, nil, ...)
  return 1
end

-- purge cutoff_ms limit: delete runs finished before the cutoff; answers how many
function OPS.purge(cutoff, limit)
  flush()
  local ids = redis.call('ZRANGEBYSCORE', K_FINISHED, '-inf', cutoff, 'LIMIT', '0', limit)
  for _, run_id in ipairs(ids) do
    local r = k_run(run_id)
    local v = redis.call('HMGET', r, 'status', 'queue', 'idempotency_key', 'kind', 'name')
    if v[1] then
      redis.call('ZREM', k_status(v[1]), run_id)
      redis.call('HINCRBY', K_COUNTS, v[2] .. ':' .. v[1], -1)
      redis.call('ZREM', k_by('queue', v[2]), run_id)
    end
    if v[4] then redis.call('ZREM', k_by('kind', v[4]), run_id) end
    if v[5] then redis.call('ZREM', k_by('name', v[5]), run_id) end
    if v[3] and v[3] ~= '' then redis.call('DEL', k_idem(v[3])) end
    redis.call('DEL', r, k_steps(run_id), k_events(run_id))
    redis.call('ZREM', K_ALL, run_id)
    redis.call('ZREM', K_FINISHED, run_id)
  end
  return #ids
end

---------------------------------------------------------------------------------------------
-- The batch.

-- The library's one function: runs a batch of operations (see the top).
local function batch(_, args)
  PREFIX = args[1]
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  NOW = str(now)
  EV_HEAD = '{"at":' .. NOW .. ',"kind":"'
  K_ALL, K_LEASES, K_COUNTS, K_FINISHED = PREFIX .. 'runs', PREFIX .. 'leases', PREFIX .. 'counts', PREFIX .. 'finished'
  forget()
  STAGE_JSON = {}
  if args[2] ~= 'batch' then return redis.error_reply('expected a batch of operations') end
  local last = #args
  -- The whole batch is checked before anything is written: a malformed one changes nothing.
  local i = 3
  while i <= last do
    local name, argc = args[i], tonumber(args[i + 1])
    if not OPS[name] or not argc or i + 1 + argc > last then
      return redis.error_reply('malformed batch: operation ' .. tostring(name))
    end
    i = i + 2 + argc
  end
  -- Each operation runs on its own: one that raises (a key of the wrong type, bad data) answers
  -- its error, and the others' writes and index changes stand. The index changes recorded
  -- before an error describe writes that happened, so they are written too.
  local results = {}
  i = 3
  while i <= last do
    local name, argc = args[i], tonumber(args[i + 1])
    local ok, answer = pcall(OPS[name], unpack(args, i + 2, i + 1 + argc))
    if not ok then
      local message = type(answer) == 'table' and answer.err or tostring(answer)
      redis.log(redis.LOG_WARNING, 'stagecraft: operation ' .. name .. ' failed: ' .. tostring(message))
      answer = { OP_ERROR, name .. ' failed: ' .. tostring(message) }
    elseif answer == nil then
      answer = { OP_ERROR, name .. ' answered nothing' }
    end
    results[#results + 1] = answer
    i = i + 2 + argc
  end
  flush()
  return results
end

-- The store appends the registration of `batch` under its versioned name.
