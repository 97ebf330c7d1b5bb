/**
 * Transport-agnostic service errors. The HTTP layer maps each class to one RFC 9457 problem
 * type in one place; anything else is an opaque 500.
 */
export abstract class ServiceError extends Error {
  /** A stable, short problem identifier, e.g. `not-found`. */
  abstract readonly code: string;

  constructor(
    message: string,
    /** Extra, safe-to-show members for the problem document. */
    readonly details?: Record<string, unknown>,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** The resource does not exist for this tenant (another tenant's resource included). */
export class NotFoundError extends ServiceError {
  readonly code = "not-found";
}

/** The request is well-formed but its content cannot be processed (e.g. an invalid checkpoint). */
export class InvalidInputError extends ServiceError {
  readonly code = "invalid-input";
}

/** The request conflicts with the resource's current state. */
export class ConflictError extends ServiceError {
  readonly code = "conflict";
}

/** A size limit was exceeded. */
export class PayloadTooLargeError extends ServiceError {
  readonly code = "payload-too-large";
}

/** The resource existed but its content has been deleted. */
export class GoneError extends ServiceError {
  readonly code = "gone";
}

/** A byte range outside the resource. */
export class RangeNotSatisfiableError extends ServiceError {
  readonly code = "range-not-satisfiable";

  constructor(
    message: string,
    readonly sizeBytes: number,
  ) {
    super(message);
  }
}

/** Missing, unknown or revoked credentials. */
export class UnauthenticatedError extends ServiceError {
  readonly code = "unauthenticated";
}

/** An error after which the same request may succeed, once `retryAfterSeconds` have passed. */
export abstract class RetryLaterError extends ServiceError {
  constructor(
    message: string,
    readonly retryAfterSeconds: number,
    details?: Record<string, unknown>,
  ) {
    super(message, details);
  }
}

/** A quota or rate limit was reached. */
export class TooManyRequestsError extends RetryLaterError {
  readonly code = "too-many-requests";
}

/** What was asked for is not there yet (a round still open): a conflict, for now. */
export class NotReadyError extends RetryLaterError {
  readonly code = "conflict";
}

/** A dependency (database, store) cannot be reached. */
export class UnavailableError extends ServiceError {
  readonly code = "unavailable";
}

/**
 * An error about the request or what it names (not found, invalid, gone, too large, ...): the
 * same request fails the same way however often it is retried. Unavailability and rate limits pass.
 */
export function isRequestError(err: unknown): boolean {
  return (
    err instanceof ServiceError && !(err instanceof UnavailableError || err instanceof TooManyRequestsError)
  );
}
