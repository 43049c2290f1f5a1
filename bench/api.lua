-- python -m bench api: wrk's script. Token look-ups spread over many users; done() prints one
-- "BENCH {json}" line with the counts and latency percentiles (microseconds).
-- Arguments (after --): appid, openid prefix, users, query string, random|walk, threads.
-- The key comes from $BENCH_KEY, so it is never on a command line.
local n = 0
local threads = {}

function setup(thread)
  thread:set("tid", n)
  n = n + 1
  table.insert(threads, thread)
end

function init(args)
  appid, prefix, users, query, walk = args[1], args[2], tonumber(args[3]), args[4], args[5]
  step, i, wrapped = tonumber(args[6]), tid, 0
  headers = {["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")}
  math.randomseed(os.time() * 31 + tid)
end

function request()
  local u
  if walk == "walk" then -- every user once (thread t asks for t, t+T, ...), then around again
    u = i % users
    if i >= users then wrapped = 1 end
    i = i + step
  else
    u = math.random(0, users - 1)
  end
  local path = string.format("/v1/apps/%s/users/%s%07d/token%s", appid, prefix, u, query)
  return wrk.format("GET", path, headers)
end

function done(s, lat, req)
  local w = 0
  for _, t in ipairs(threads) do w = math.max(w, t:get("wrapped")) end
  io.write(string.format('BENCH {"requests":%d,"duration_us":%d,"non2xx":%d,'
    .. '"socket_errors":%d,"timeouts":%d,"wrapped":%d,"p50_us":%d,"p90_us":%d,'
    .. '"p99_us":%d,"max_us":%d}\n',
    s.requests, s.duration, s.errors.status, s.errors.connect + s.errors.read + s.errors.write,
    s.errors.timeout, w, lat:percentile(50), lat:percentile(90), lat:percentile(99), lat.max))
end
