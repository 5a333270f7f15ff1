-- wrk script for the benchmark: POST one JSON body with fixed headers, and print the
-- run's numbers as one JSON line that bench/load.py parses.
--   BENCH_BODY_FILE  path of the request body
--   BENCH_HEADERS    header lines, "Name: value" separated by newlines

local body_file = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = body_file:read("*a")
body_file:close()
for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\n]+") do
  local name, value = string.match(line, "^([^:]+):%s*(.*)$")
  wrk.headers[name] = value
end

function done(summary, latency, requests)
  -- errors.status counts answers with a status of 400 or more.
  local errors = summary.errors
  io.write(string.format(
    '\nBENCH_JSON {"requests":%d,"duration_us":%d,"http_errors":%d,"socket_errors":%d,' ..
    '"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, errors.status,
    errors.connect + errors.read + errors.write, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
