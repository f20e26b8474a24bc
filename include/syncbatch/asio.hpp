// async_submit: a submitter for Boost.Asio programs, with any completion token.
#pragma once

#include <concepts>
#include <exception>
#include <utility>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>

#include "syncbatch/batched_submitter.hpp"
#include "syncbatch/clock.hpp"

namespace syncbatch {

namespace detail {
/// A completion callback of the shape submit_then() takes, for the Submitter concept.
template <class Out>
struct IgnoreResult {
  void operator()(std::exception_ptr, Out) const noexcept {}
};
}  // namespace detail

/// What async_submit needs of a submitter: its Input and Output types, and
/// `submit_then(Input, callback, RequestOptions)` calling `callback(std::exception_ptr, Output)`
/// once and returning a Cancellation. BatchedSubmitter and MultiDeviceSubmitter are Submitters.
template <class S>
concept Submitter = requires {
  typename S::Input;
  typename S::Output;
}
&&requires(S& s, typename S::Input in, const RequestOptions& options) {
  {
    s.submit_then(std::move(in), detail::IgnoreResult<typename S::Output>{}, options)
    } -> std::same_as<Cancellation<typename S::Output>>;
};

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
/// Cancellation: through the handler's associated cancellation slot (`bind_cancellation_slot`,
/// `experimental::parallel_group`, the `||` awaitable operator with a timer), any cancellation
/// type cancels the request as Future::cancel() does; the handler then gets Error(kCancelled),
/// or the value if the request was past the point of no return. Emit the signal on the
/// handler's executor (as those utilities do). On an io_context run by several threads that
/// executor must be a strand (`co_spawn(make_strand(io), ...)`), or each thread runs an
/// io_context of its own (as the server, server/, does): `||` and parallel_group run both
/// operations and emit the loser's cancellation on the coroutine's executor, and a
/// cancellation slot is not thread-safe.
///
/// Errors: a request that is not accepted (shut down, or queue full with kReject), whose
/// deadline passes before it starts, or that is cancelled completes with a syncbatch::Error;
/// the model's exception for this request completes it with that exception.
/// Thread safety: as the submitter's submit_then().
///
/// `request_options` carries the deadline and the priority level (RequestOptions); the overload
/// with a time point sets the deadline alone.
template <Submitter S, class Token>
auto async_submit(S& submitter, typename S::Input input, Token&& token,
                  RequestOptions request_options) {
  using Out = typename S::Output;
  return boost::asio::async_initiate<Token, void(std::exception_ptr, Out)>(
      [&submitter, request_options](auto handler, typename S::Input in) {
        auto work = boost::asio::prefer(boost::asio::get_associated_executor(handler),
                                        boost::asio::execution::outstanding_work.tracked);
        auto slot = boost::asio::get_associated_cancellation_slot(handler);
        const Cancellation<Out> cancellation = submitter.submit_then(
            std::move(in),
            [handler = std::move(handler), work = std::move(work), slot](std::exception_ptr error,
                                                                         Out value) mutable {
              auto ex = std::move(work);  // called once: the request may outlive this call
              boost::asio::post(std::move(ex),
                                [handler = std::move(handler), slot, error = std::move(error),
                                 value = std::move(value)]() mutable {
                                  // On the handler's executor, where the slot is emitted: the
                                  // operation is over.
                                  if (slot.is_connected()) slot.clear();
                                  std::move(handler)(std::move(error), std::move(value));
                                });
            },
            request_options);
        // Any cancellation type cancels (see BatchedSubmitter: a request is cancelled at
        // whatever stage it is in, and completes exactly once either way).
        if (slot.is_connected() && cancellation)
          slot.assign([cancellation](boost::asio::cancellation_type) { cancellation.cancel(); });
      },
      token, std::move(input));
}

/// As above, with a deadline alone.
template <Submitter S, class Token>
auto async_submit(S& submitter, typename S::Input input, Token&& token,
                  Clock::time_point deadline = Clock::time_point::max()) {
  return async_submit(submitter, std::move(input), std::forward<Token>(token),
                      RequestOptions{.deadline = deadline});
}

}  // namespace syncbatch
