"""The engine's Lua scripts: each runs atomically inside Redis (standalone Redis or Valkey).

Keys are named from a prefix (``labd:`` by default) passed in ARGV; the lab runs on one
engine instance, not a Redis Cluster, so undeclared keys are fine.

Claims are hashes ``<prefix>claim:<device>`` with fields ``key`` (the owner's unique key),
``token``, ``label``, ``kind``, ``oid``, ``node``, ``since``, expiring with the claim TTL.
Waiters are a sorted set ``<prefix>queue`` (ticket -> ticket) and strings
``<prefix>waiter:<ticket>`` = ``key US label US kind US oid US node US since US dev dev ...``
(US = \\x1f) that expire unless refreshed; a waiter whose string is gone left the queue.
"""

from __future__ import annotations

__all__ = ["CLAIM", "PUSH_EXPIRE", "REGISTER", "RELEASE", "RENEW", "UNREGISTER"]

#: KEYS: a list. ARGV: payload, ttl ms. RPUSH and PEXPIRE as one command (a reply whose caller
#: gave up must not stay in the engine).
PUSH_EXPIRE = r"""
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Split s on the unit separator (plain find: no Lua patterns on user text).
_SPLIT = r"""
local function split(s, sep)
  local out = {}
  local start = 1
  while true do
    local i = string.find(s, sep, start, true)
    if not i then table.insert(out, string.sub(s, start)) return out end
    table.insert(out, string.sub(s, start, i - 1))
    start = i + 1
  end
end
"""

#: KEYS: none. ARGV: prefix, owner key, label, kind, owner id, node, ttl ms, ticket ('' for
#: none), device ids... Returns {1, token} or {0, {{device, key, label, kind, oid, node, since,
#: token ('0': reserved by a waiter)}, ...}}.
CLAIM = _SPLIT + r"""
local prefix, me = ARGV[1], ARGV[2]
local ttl, ticket = tonumber(ARGV[7]), ARGV[8]
local devices = {}
for i = 9, #ARGV do table.insert(devices, ARGV[i]) end
local busy, free = {}, {}
for _, dev in ipairs(devices) do
  local h = redis.call('HMGET', prefix .. 'claim:' .. dev, 'key', 'label', 'kind', 'oid', 'node', 'since', 'token')
  if h[1] then
    if h[1] ~= me then table.insert(busy, {dev, h[1], h[2], h[3], h[4], h[5], h[6], h[7]}) end
  else
    free[dev] = true
  end
end
if #busy == 0 then
  local top = '+inf'
  if ticket ~= '' then top = '(' .. ticket end
  local queue = prefix .. 'queue'
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', queue, '-inf', top)) do
    local desc = redis.call('GET', prefix .. 'waiter:' .. w)
    if not desc then
      redis.call('ZREM', queue, w)
    else
      local f = split(desc, '\031')
      for dev in string.gmatch(f[7], '%S+') do
        if free[dev] then
          free[dev] = nil
          table.insert(busy, {dev, f[1], f[2], f[3], f[4], f[5], f[6], '0'})
        end
      end
    end
  end
end
if #busy > 0 then return {0, busy} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', prefix .. 'fence') or '0')
local token = math.max(last + 1, now)
local token_s = string.format('%.0f', token)
redis.call('SET', prefix .. 'fence', token_s)
local since = string.format('%.6f', now / 1000000)
for _, dev in ipairs(devices) do
  local key = prefix .. 'claim:' .. dev
  redis.call('DEL', key)
  redis.call('HSET', key, 'key', me, 'token', token_s, 'label', ARGV[3], 'kind', ARGV[4],
             'oid', ARGV[5], 'node', ARGV[6], 'since', since)
  redis.call('PEXPIRE', key, ttl)
end
if ticket ~= '' then
  redis.call('ZREM', prefix .. 'queue', ticket)
  redis.call('DEL', prefix .. 'waiter:' .. ticket)
end
return {1, token_s}
"""

#: ARGV: prefix, token, ttl ms, device ids... Returns the devices whose claim is not ``token``.
RENEW = r"""
local prefix, token, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lost = {}
for i = 4, #ARGV do
  local key = prefix .. 'claim:' .. ARGV[i]
  if redis.call('HGET', key, 'token') == token then
    redis.call('PEXPIRE', key, ttl)
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

#: ARGV: prefix, token, device ids... Deletes the claims that still carry ``token``.
RELEASE = r"""
local prefix, token = ARGV[1], ARGV[2]
local n = 0
for i = 3, #ARGV do
  local key = prefix .. 'claim:' .. ARGV[i]
  if redis.call('HGET', key, 'token') == token then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""

#: ARGV: prefix, node, ttl ms, node info (JSON), instance, device ids... Returns {1}, {0,
#: device, holder node} (a device id held by another live node) or {2, node} (the name is
#: used by another live instance); a refusal registers nothing.
REGISTER = r"""
local prefix, node, ttl, instance = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[5]
local owner = redis.call('GET', prefix .. 'instance:' .. node)
if owner and owner ~= instance then return {2, node} end
for i = 6, #ARGV do
  local held = redis.call('GET', prefix .. 'dev:' .. ARGV[i])
  if held and held ~= node then return {0, ARGV[i], held} end
end
redis.call('SET', prefix .. 'node:' .. node, ARGV[4], 'PX', ttl)
redis.call('SET', prefix .. 'instance:' .. node, instance, 'PX', ttl)
for i = 6, #ARGV do
  redis.call('SET', prefix .. 'dev:' .. ARGV[i], node, 'PX', ttl)
end
return {1}
"""

#: ARGV: prefix, node, instance, device ids... Removes the node and the device keys it holds,
#: unless another instance uses the name now.
UNREGISTER = r"""
local prefix, node, instance = ARGV[1], ARGV[2], ARGV[3]
local owner = redis.call('GET', prefix .. 'instance:' .. node)
if owner and owner ~= instance then return 0 end
redis.call('DEL', prefix .. 'node:' .. node)
redis.call('DEL', prefix .. 'instance:' .. node)
for i = 4, #ARGV do
  local key = prefix .. 'dev:' .. ARGV[i]
  if redis.call('GET', key) == node then redis.call('DEL', key) end
end
return 1
"""
