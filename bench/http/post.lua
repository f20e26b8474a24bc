-- wrk script for the server (server/): POSTs one row of `width` floats (0.5 each) per request.
--   wrk -t2 -c8 -d5s --latency -s bench/http/post.lua http://127.0.0.1:8080/v1/infer -- raw 256
--   wrk ... -s bench/http/post.lua http://127.0.0.1:8080/v2/models/model/infer -- oip 256
-- args: encoding (raw: little-endian float32 bytes; json: a JSON array; oip: an Open Inference
-- Protocol infer request with JSON tensor data; oip-binary: the same with the binary tensor data
-- extension both ways), and the row's width, or for OIP its shape after the rows (3,224,224 for
-- an image).
-- The request is the same every time, set up in init: with no request() function wrk formats
-- it once per thread and sends those bytes, calling no Lua per request (a request() function
-- costs wrk's threads a Lua call each, and the client, not the server, becomes the limit).
function init(args)
  local encoding, shape = args[1] or "raw", args[2] or "256"
  local width = 1
  for d in string.gmatch(shape, "%d+") do width = width * tonumber(d) end
  local bytes = string.rep(string.char(0, 0, 0, 63), width)  -- 0.5f, little endian
  wrk.method = "POST"
  if encoding == "oip-binary" then
    local header = '{"inputs":[{"name":"input","shape":[1,' .. shape ..
                   '],"datatype":"FP32","parameters":{"binary_data_size":' .. 4 * width ..
                   '}}],"parameters":{"binary_data_output":true}}'
    wrk.headers["Content-Type"] = "application/octet-stream"
    wrk.headers["Inference-Header-Content-Length"] = tostring(#header)
    wrk.body = header .. bytes
  elseif encoding == "raw" then
    wrk.headers["Content-Type"] = "application/octet-stream"
    wrk.body = bytes
  else
    local t = {}
    for i = 1, width do t[i] = "0.5" end
    local row = "[" .. table.concat(t, ",") .. "]"
    if encoding == "oip" then
      row = '{"inputs":[{"name":"input","shape":[1,' .. shape ..
            '],"datatype":"FP32","data":' .. row .. '}]}'
    end
    wrk.headers["Content-Type"] = "application/json"
    wrk.body = row
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d requests_per_s=%.1f p50_us=%d p90_us=%d p99_us=%d non2xx=%d socket_errors=%d\n",
    summary.requests, summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(90),
    latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
