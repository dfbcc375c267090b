/// The subset of YAML the config file uses: block mappings and sequences by indentation,
/// plain and quoted scalars, comments. (A full YAML library would pull Foundation into the
/// agent and add megabytes to its memory.) Anything else is reported as unsupported.
public indirect enum YAMLNode {
    case scalar(String, line: Int)
    case mapping([(key: String, value: YAMLNode)], line: Int)
    case sequence([YAMLNode], line: Int)
    case empty(line: Int)

    public var line: Int {
        switch self {
        case .scalar(_, let l), .mapping(_, let l), .sequence(_, let l), .empty(let l): return l
        }
    }
}

public struct YAMLError: Error, CustomStringConvertible {
    public let line: Int
    public let message: String
    public var description: String { "line \(line): \(message)" }
}

public enum MiniYAML {
    struct Line { var indent: Int; var text: String; var number: Int; var isDash: Bool }

    public static func parse(_ source: String) throws -> YAMLNode {
        var lines: [Line] = []
        var number = 0
        for raw in source.split(separator: "\n", omittingEmptySubsequences: false) {
            number += 1
            var text = stripComment(String(raw))
            while text.last == " " || text.last == "\t" || text.last == "\r" { text.removeLast() }
            if text.yamlTrimmed().isEmpty { continue }
            if text.contains("\t") && text.prefix(while: { $0 == " " || $0 == "\t" }).contains("\t") {
                throw YAMLError(line: number, message: "tabs cannot indent YAML; use spaces")
            }
            if text == "---" { continue }
            var indent = text.prefix(while: { $0 == " " }).count
            var body = String(text.dropFirst(indent))
            // "- key: value" becomes a dash line, then "key: value" two columns in.
            while body == "-" || body.hasPrefix("- ") {
                lines.append(Line(indent: indent, text: "-", number: number, isDash: true))
                let rest = body.dropFirst(1)
                let pad = rest.prefix(while: { $0 == " " }).count
                indent += 1 + pad
                body = String(rest.dropFirst(pad))
                if body.isEmpty { break }
            }
            if !body.isEmpty { lines.append(Line(indent: indent, text: body, number: number, isDash: false)) }
        }
        var i = 0
        guard !lines.isEmpty else { return .empty(line: 1) }
        let node = try block(lines, &i, indent: lines[0].indent)
        if i < lines.count { throw YAMLError(line: lines[i].number, message: "unexpected indentation") }
        return node
    }

    static func stripComment(_ s: String) -> String {
        var inSingle = false, inDouble = false
        var prev: Character = " "
        var out = ""
        for c in s {
            if c == "'" && !inDouble { inSingle.toggle() }
            if c == "\"" && !inSingle && prev != "\\" { inDouble.toggle() }
            if c == "#" && !inSingle && !inDouble && (prev == " " || out.isEmpty) { break }
            out.append(c); prev = c
        }
        return out
    }

    static func block(_ lines: [Line], _ i: inout Int, indent: Int) throws -> YAMLNode {
        let first = lines[i]
        if first.isDash {
            var items: [YAMLNode] = []
            while i < lines.count, lines[i].indent == indent, lines[i].isDash {
                let dash = lines[i]
                i += 1
                if i < lines.count, lines[i].indent > indent {
                    items.append(try block(lines, &i, indent: lines[i].indent))
                } else {
                    items.append(.empty(line: dash.number))
                }
            }
            return .sequence(items, line: first.number)
        }
        if splitKey(first.text) == nil {
            i += 1
            return .scalar(try scalar(first.text, first.number), line: first.number)
        }
        var entries: [(key: String, value: YAMLNode)] = []
        while i < lines.count, lines[i].indent == indent, !lines[i].isDash {
            let l = lines[i]
            guard let (key, rest) = splitKey(l.text) else {
                throw YAMLError(line: l.number, message: "expected 'key: value'")
            }
            if entries.contains(where: { $0.key == key }) { throw YAMLError(line: l.number, message: "key '\(key)' appears twice") }
            i += 1
            if !rest.isEmpty {
                entries.append((key, .scalar(try scalar(rest, l.number), line: l.number)))
            } else if i < lines.count, lines[i].indent > indent || (lines[i].indent == indent && lines[i].isDash) {
                entries.append((key, try block(lines, &i, indent: lines[i].indent)))
            } else {
                entries.append((key, .empty(line: l.number)))
            }
        }
        if i < lines.count, lines[i].indent > indent {
            throw YAMLError(line: lines[i].number, message: "unexpected indentation")
        }
        return .mapping(entries, line: first.number)
    }

    /// "key: value" or "key:" → (key, value); nil when the line is not a mapping entry.
    static func splitKey(_ text: String) -> (String, String)? {
        var inSingle = false, inDouble = false
        var idx = text.startIndex
        while idx < text.endIndex {
            let c = text[idx]
            if c == "'" && !inDouble { inSingle.toggle() }
            if c == "\"" && !inSingle { inDouble.toggle() }
            if c == ":" && !inSingle && !inDouble {
                let next = text.index(after: idx)
                if next == text.endIndex || text[next] == " " {
                    let key = String(text[..<idx]).yamlTrimmed()
                    let value = next == text.endIndex ? "" : String(text[next...]).yamlTrimmed()
                    guard !key.isEmpty else { return nil }
                    return (unquote(key), value)
                }
            }
            idx = text.index(after: idx)
        }
        return nil
    }

    static func unquote(_ s: String) -> String {
        if s.count >= 2, (s.first == "\"" && s.last == "\"") || (s.first == "'" && s.last == "'") {
            return String(s.dropFirst().dropLast())
        }
        return s
    }

    static func scalar(_ text: String, _ line: Int) throws -> String {
        let t = text.yamlTrimmed()
        if let f = t.first, f == "[" || f == "{" || f == "|" || f == ">" || f == "&" || f == "*" || f == "!" {
            throw YAMLError(line: line, message: "this YAML form is not supported in walship's config (write plain values, one per line)")
        }
        if t.first == "\"" {
            guard t.count >= 2, t.last == "\"" else { throw YAMLError(line: line, message: "unterminated quoted string") }
            var out = ""
            var escape = false
            for c in t.dropFirst().dropLast() {
                if escape {
                    switch c { case "n": out.append("\n"); case "t": out.append("\t"); default: out.append(c) }
                    escape = false
                } else if c == "\\" { escape = true } else { out.append(c) }
            }
            return out
        }
        if t.first == "'" {
            guard t.count >= 2, t.last == "'" else { throw YAMLError(line: line, message: "unterminated quoted string") }
            return String(t.dropFirst().dropLast()).replacingOccurrencesOfDoubledQuote()
        }
        return t
    }
}

extension String {
    func replacingOccurrencesOfDoubledQuote() -> String {
        var out = ""
        var prevQuote = false
        for c in self {
            if c == "'" && prevQuote { prevQuote = false; continue }
            prevQuote = c == "'"
            out.append(c)
        }
        return out
    }
}

extension String {
    /// Without leading and trailing spaces, tabs, newlines and NULs.
    func yamlTrimmed() -> String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\n" || c == "\t" || c == "\0" { s = s.dropFirst() }
        while let c = s.last, c == " " || c == "\n" || c == "\t" || c == "\0" { s = s.dropLast() }
        return String(s)
    }
}
