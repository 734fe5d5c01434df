"""The steps of a Celery task's records (see :mod:`.claims`) that its control options add,
each a Lua script, one round trip: booking a retry, and claiming an expiry."""

# KEYS: the task's hash, the app's counts. ARGV: the retries so far, when the next attempt is
# due, the message that tells the submitter, its reply channel or '' for the one in the task's
# hash. Only a running task (its attempt's claim holds) waits for a retry: one whose end was
# booked meanwhile (declared lost) stays as it ended. Counted 'retrying' until its next claim.
RETRYING_STEP = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'retrying', 'retries', ARGV[1], 'due_at', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'retrying', 1)
local reply = ARGV[4] ~= '' and ARGV[4] or redis.call('HGET', KEYS[1], 'reply')
if reply then redis.call('PUBLISH', reply, ARGV[3]) end
return 1
"""

# KEYS: the task's hash, the app's counts. ARGV: the time. A claim, as a cancel's: the first of
# it, a cancel and a worker's claim to run holds; if it wins (never twice), the task is booked
# expired, and the script returns the submitter's reply channel ('' if not known yet), else
# nil. The end is published afterwards (see 'CeleryRecords.publish_end'): after
# 'task_cancelled' is sent, as on threads the signal comes before the future wakes.
EXPIRE = """
if redis.call('HSETNX', KEYS[1], 'claim', 'expired') == 0 then return false end
redis.call('HSET', KEYS[1], 'state', 'expired', 'finished_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'due_at', 'held_at', 'redelivery_at')
redis.call('HINCRBY', KEYS[2], 'expired', 1)
return redis.call('HGET', KEYS[1], 'reply') or ''
"""
