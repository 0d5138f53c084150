import ArgumentParser

/// A length of time on the command line: a number with a unit (`500ms`, `30s`, `10m`, `2h`,
/// `1d`), or bare seconds. Anything else is refused with the accepted forms, before anything runs.
struct DurationArgument: ExpressibleByArgument, Equatable, Sendable, CustomStringConvertible {
    let milliseconds: Int64
    let text: String

    init?(argument: String) {
        let units: [(suffix: String, milliseconds: Int64)] = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)]
        let unit = units.first { argument.hasSuffix($0.suffix) && Int64(argument.dropLast($0.suffix.count)) != nil }
        let number = unit.map { String(argument.dropLast($0.suffix.count)) } ?? argument
        // Digits only: no sign, no spaces, no fractions (Int64's parser would take a leading '+').
        guard !number.isEmpty, number.allSatisfy(\.isASCII), number.allSatisfy(\.isNumber),
              let count = Int64(number), count > 0 else { return nil }
        let (total, overflow) = count.multipliedReportingOverflow(by: unit?.milliseconds ?? 1000)
        guard !overflow, total <= 365 * 86_400_000 else { return nil }
        milliseconds = total
        text = argument
    }

    var duration: Duration { .milliseconds(milliseconds) }
    var description: String { text }
    static var defaultCompletionKind: CompletionKind { .default }
}
