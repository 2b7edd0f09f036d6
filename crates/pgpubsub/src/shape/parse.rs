//! The text form: `status = 'paid' and (qty >= 2 or note is null)`.
//!
//! ```text
//! filter    := or
//! or        := and ("or" and)*
//! and       := unary ("and" unary)*
//! unary     := "not" unary | "(" filter ")" | predicate
//! predicate := column ("=" | "<>" | "!=" | "<" | "<=" | ">" | ">=") value
//!            | column ["not"] "in" "(" value ("," value)* ")"
//!            | column "is" ["not"] "null"
//!            | column ["not"] "like" string
//! column    := bare identifier (folded to lower case) | "quoted identifier"
//! value     := string | number | "true" | "false"
//! string    := 'text, with '' for a quote'
//! number    := -?digits[.digits][e[+-]digits]
//! ```
//!
//! Keywords are case-insensitive. A recursive-descent parser whose depth is
//! bounded by [`MAX_DEPTH`] (parentheses and `not`s), so no input can
//! overflow the stack.

use super::filter::{CompareOp, Filter, FilterError, Literal, MAX_BYTES, MAX_DEPTH, MAX_TERMS, MAX_VALUES};
use super::lex::{Lexer, Token};

struct Parser<'a> {
    lexer: Lexer<'a>,
    /// The current token and where it starts.
    token: Token,
    at: usize,
    terms: usize,
    values: usize,
}

impl Filter {
    /// Parses the text form (see the module docs of [`crate::shape`]).
    ///
    /// # Errors
    /// [`FilterError::Syntax`] with the byte position and what was expected;
    /// [`FilterError::TooDeep`] or [`FilterError::TooLarge`] past the bounds.
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        if text.len() > MAX_BYTES {
            return Err(FilterError::TooLarge("65536 bytes"));
        }
        let mut p = Parser { lexer: Lexer { text, pos: 0 }, token: Token::End, at: 0, terms: 0, values: 0 };
        p.advance()?;
        let filter = p.or(0)?;
        match p.token {
            Token::End => Ok(filter),
            _ => Err(p.expected("`and`, `or` or the end of the filter")),
        }
    }
}

impl std::str::FromStr for Filter {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Filter::parse(s)
    }
}

impl Parser<'_> {
    /// Reads the next token into `self.token`.
    fn advance(&mut self) -> Result<(), FilterError> {
        (self.token, self.at) = self.lexer.next()?;
        Ok(())
    }

    fn expected(&self, what: &str) -> FilterError {
        FilterError::Syntax { position: self.at, expected: what.into(), found: self.token.describe() }
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(&self.token, Token::Word(w) if w == word)
    }

    fn eat_word(&mut self, word: &str) -> Result<bool, FilterError> {
        let is = self.is_word(word);
        if is {
            self.advance()?;
        }
        Ok(is)
    }

    fn deeper(depth: usize) -> Result<usize, FilterError> {
        if depth >= MAX_DEPTH {
            return Err(FilterError::TooDeep);
        }
        Ok(depth + 1)
    }

    fn or(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut parts = vec![self.and(depth)?];
        while self.eat_word("or")? {
            parts.push(self.and(depth)?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Filter::Or(parts) })
    }

    fn and(&mut self, depth: usize) -> Result<Filter, FilterError> {
        let mut parts = vec![self.unary(depth)?];
        while self.eat_word("and")? {
            parts.push(self.unary(depth)?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Filter::And(parts) })
    }

    fn unary(&mut self, depth: usize) -> Result<Filter, FilterError> {
        if self.eat_word("not")? {
            return Ok(Filter::Not(Box::new(self.unary(Self::deeper(depth)?)?)));
        }
        if self.token == Token::Open {
            let depth = Self::deeper(depth)?;
            self.advance()?;
            let inner = self.or(depth)?;
            if self.token != Token::Close {
                return Err(self.expected("`and`, `or` or `)`"));
            }
            self.advance()?;
            return Ok(inner);
        }
        self.predicate()
    }

    fn predicate(&mut self) -> Result<Filter, FilterError> {
        let column = match &self.token {
            Token::Word(w) if !super::words::is_keyword(w) => w.clone(),
            Token::Quoted(q) => q.clone(),
            _ => return Err(self.expected("a column, `not` or `(`")),
        };
        self.terms += 1;
        if self.terms > MAX_TERMS {
            return Err(FilterError::TooLarge("256 predicates"));
        }
        self.advance()?;
        if let Token::Op(op) = self.token {
            let op = CompareOp::from_symbol(op).ok_or_else(|| self.expected("an operator"))?;
            self.advance()?;
            return Ok(Filter::Compare { column, op, value: self.value()? });
        }
        if self.eat_word("is")? {
            let negated = self.eat_word("not")?;
            if !self.eat_word("null")? {
                return Err(self.expected(if negated { "`null`" } else { "`null` or `not null`" }));
            }
            return Ok(Filter::IsNull { column, negated });
        }
        let negated = self.eat_word("not")?;
        let filter = if self.eat_word("in")? {
            self.list(column)?
        } else if self.eat_word("like")? {
            match std::mem::replace(&mut self.token, Token::End) {
                Token::Str(pattern) => {
                    self.advance()?;
                    Filter::Like { column, pattern }
                }
                other => {
                    self.token = other;
                    return Err(self.expected("a quoted pattern"));
                }
            }
        } else if negated {
            return Err(self.expected("`in` or `like`"));
        } else {
            return Err(self.expected("an operator (=, <>, <, <=, >, >=), `in`, `is` or `like`"));
        };
        Ok(if negated { Filter::Not(Box::new(filter)) } else { filter })
    }

    fn list(&mut self, column: String) -> Result<Filter, FilterError> {
        if self.token != Token::Open {
            return Err(self.expected("`(`"));
        }
        self.advance()?;
        let mut values = vec![self.value()?];
        while self.token == Token::Comma {
            self.advance()?;
            values.push(self.value()?);
        }
        if self.token != Token::Close {
            return Err(self.expected("`,` or `)`"));
        }
        self.advance()?;
        Ok(Filter::In { column, values })
    }

    fn value(&mut self) -> Result<Literal, FilterError> {
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(FilterError::TooLarge("1024 values"));
        }
        let value = match &self.token {
            Token::Str(s) => Literal::Text(s.clone()),
            Token::Num(n) => Literal::Number(n.clone()),
            Token::Word(w) if w == "true" || w == "false" => Literal::Bool(w == "true"),
            Token::Word(w) if w == "null" => {
                return Err(self.expected("a value (a comparison with null is never true: use `is null`)"))
            }
            _ => return Err(self.expected("a value: 'string', number, true or false")),
        };
        self.advance()?;
        Ok(value)
    }
}
