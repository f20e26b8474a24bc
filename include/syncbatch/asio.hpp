// async_submit: BatchedSubmitter for Boost.Asio programs, with any completion token.
#pragma once

#include <exception>
#include <utility>

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>

#include "syncbatch/batched_submitter.hpp"

namespace syncbatch {

/// Submits `input` and completes `token` with signature `void(std::exception_ptr, Out)` once
/// the request's batch has synced. Any Asio completion token works: `use_awaitable`
/// (`Out y = co_await async_submit(s, x, use_awaitable);` throws on error), `use_future`
/// (a `std::future<Out>`), `deferred`, or a plain callback `(std::exception_ptr, Out)`.
///
/// The completion runs on the executor associated with the token's handler (the coroutine's,
/// or one bound with `bind_executor`), through `post`: never inline on the worker thread, never
/// inside this call. A handler with no associated executor runs on `system_executor`. The
/// executor's outstanding work is tracked until the completion runs, so an io_context does not
/// run out of work while a request is in flight.
///
/// Errors: a request that is not accepted (shut down, or queue full with kReject) or not
/// started by `deadline` completes with a syncbatch::Error; the model's exception for this
/// request completes it with that exception.
/// Thread safety: as BatchedSubmitter::submit().
template <class In, class Out, class Backend, class Token>
auto async_submit(BatchedSubmitter<In, Out, Backend>& submitter, In input, Token&& token,
                  Clock::time_point deadline = Clock::time_point::max()) {
  return boost::asio::async_initiate<Token, void(std::exception_ptr, Out)>(
      [&submitter, deadline](auto handler, In in) {
        auto work = boost::asio::prefer(boost::asio::get_associated_executor(handler),
                                        boost::asio::execution::outstanding_work.tracked);
        submitter.submit_then(
            std::move(in),
            [handler = std::move(handler), work = std::move(work)](std::exception_ptr error,
                                                                   Out value) mutable {
              auto ex = work;
              boost::asio::post(std::move(ex),
                                [handler = std::move(handler), error = std::move(error),
                                 value = std::move(value)]() mutable {
                                  std::move(handler)(std::move(error), std::move(value));
                                });
            },
            deadline);
      },
      token, std::move(input));
}

}  // namespace syncbatch
